//! container attestor: container id, runtime and Kubernetes pod uid, read
//! from the cgroup layouts docker, containerd, CRI-O, podman and kubelet
//! create. Only the outermost container counts; anything nested inside it
//! was created by the container itself and is not trusted.

use crate::attestor::Attestor;
use crate::cgroup::TrustedRoots;
use crate::error::AttestError;
use crate::process::PinnedProcess;
use crate::selector::Selector;
use crate::snapshot::ProcessSnapshot;
use crate::systemd::systemd_placement;

const CONTAINER_ID_LEN: usize = 64;
const POD_UID_MAX: usize = 128;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerInfo<'a> {
    pub id: &'a str,
    /// `docker`, `containerd`, `crio` or `podman`; `None` where the layout
    /// does not say (kubelet's cgroupfs driver names only the id).
    pub runtime: Option<&'static str>,
    pub pod_uid: Option<String>,
}

/// Recognises:
/// - systemd driver: a `docker-<id>.scope`, `cri-containerd-<id>.scope`,
///   `crio-<id>.scope` or `libpod-<id>.scope` unit after the slice chain
///   (`/system.slice/docker-<id>.scope`, `/machine.slice/libpod-<id>.scope`,
///   `/kubepods.slice/.../kubepods-burstable-pod<uid_>.slice/cri-containerd-<id>.scope`);
/// - cgroupfs driver: `/docker/<id>` and `/kubepods[/<qos>]/pod<uid>/<id>`
///   (or `crio-<id>`).
///
/// Ids must be 64 lowercase hex digits, which also rules out the
/// `crio-conmon-`/`libpod-conmon-` monitor scopes.
pub fn container_from_cgroup_path(path: &str) -> Option<ContainerInfo<'_>> {
    let placement = systemd_placement(path);
    if let Some(unit) = placement.unit {
        let (runtime, id) = scope_container(unit)?;
        let pod_uid = if placement.slices().next() == Some("kubepods.slice") {
            placement.slice().and_then(pod_uid_from_slice)
        } else {
            None
        };
        return Some(ContainerInfo {
            id,
            runtime: Some(runtime),
            pod_uid,
        });
    }

    let mut components = path.split('/').skip(1);
    match components.next()? {
        "docker" => {
            let id = components.next().filter(|id| is_container_id(id))?;
            Some(ContainerInfo {
                id,
                runtime: Some("docker"),
                pod_uid: None,
            })
        }
        "kubepods" => {
            let mut next = components.next()?;
            if next == "burstable" || next == "besteffort" {
                next = components.next()?;
            }
            let pod_uid = next.strip_prefix("pod").filter(|uid| is_pod_uid(uid))?;
            let leaf = components.next()?;
            let (runtime, id) = match leaf.strip_prefix("crio-") {
                Some(id) => (Some("crio"), id),
                None => (None, leaf),
            };
            if !is_container_id(id) {
                return None;
            }
            Some(ContainerInfo {
                id,
                runtime,
                pod_uid: Some(pod_uid.to_owned()),
            })
        }
        _ => None,
    }
}

fn scope_container(unit: &str) -> Option<(&'static str, &str)> {
    let stem = unit.strip_suffix(".scope")?;
    const PREFIXES: [(&str, &str); 4] = [
        ("docker-", "docker"),
        ("cri-containerd-", "containerd"),
        ("crio-", "crio"),
        ("libpod-", "podman"),
    ];
    PREFIXES.iter().find_map(|(prefix, runtime)| {
        stem.strip_prefix(prefix)
            .filter(|id| is_container_id(id))
            .map(|id| (*runtime, id))
    })
}

/// `kubepods-burstable-pod<uid>.slice`, where systemd's escaping turned the
/// uid's '-' into '_' ('-' separates slice levels).
fn pod_uid_from_slice(slice: &str) -> Option<String> {
    let stem = slice.strip_suffix(".slice")?;
    let escaped = stem.rsplit('-').next()?.strip_prefix("pod")?;
    let uid = escaped.replace('_', "-");
    is_pod_uid(&uid).then_some(uid)
}

fn is_container_id(id: &str) -> bool {
    id.len() == CONTAINER_ID_LEN && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Pod uids are UUIDs, or 32-hex hashes for static pods.
fn is_pod_uid(uid: &str) -> bool {
    !uid.is_empty()
        && uid.len() <= POD_UID_MAX
        && uid.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-')
}

#[derive(Debug, Clone)]
pub struct ContainerAttestor {
    roots: TrustedRoots,
}

impl ContainerAttestor {
    pub fn new(roots: TrustedRoots) -> Self {
        Self { roots }
    }
}

impl Attestor for ContainerAttestor {
    fn name(&self) -> &'static str {
        "container"
    }

    fn attest(
        &self,
        _process: &PinnedProcess,
        snapshot: &ProcessSnapshot,
        out: &mut Vec<Selector>,
    ) -> Result<(), AttestError> {
        let Some((path, _root)) = self.roots.trusted_path(snapshot) else {
            return Ok(());
        };
        let Some(info) = container_from_cgroup_path(path) else {
            return Ok(());
        };
        out.push(Selector::with_key("container", "id", info.id));
        if let Some(runtime) = info.runtime {
            out.push(Selector::with_key("container", "runtime", runtime));
        }
        if let Some(uid) = info.pod_uid {
            out.push(Selector::with_key("container", "pod_uid", uid));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "3f4b8c1d2e5a6b7c8d9e0f1a2b3c4d5e6f7a8b9c0d1e2f3a4b5c6d7e8f9a0b1c";
    const ID2: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    const POD: &str = "0b2f7c1e-9d3a-4e5b-8c6d-7e8f9a0b1c2d";

    fn info(path: &str) -> Option<(String, Option<&'static str>, Option<String>)> {
        container_from_cgroup_path(path).map(|i| (i.id.to_owned(), i.runtime, i.pod_uid))
    }

    #[test]
    fn docker_systemd_and_cgroupfs_drivers() {
        let want = Some((ID.to_owned(), Some("docker"), None));
        assert_eq!(info(&format!("/system.slice/docker-{ID}.scope")), want);
        assert_eq!(info(&format!("/docker/{ID}")), want);
        // Sub-cgroups inside the container belong to the same container.
        assert_eq!(info(&format!("/docker/{ID}/docker/{ID2}")), want);
        assert_eq!(
            info(&format!("/system.slice/docker-{ID}.scope/inner")),
            want
        );
    }

    #[test]
    fn containerd_crio_and_podman_scopes() {
        assert_eq!(
            info(&format!("/system.slice/cri-containerd-{ID}.scope")),
            Some((ID.to_owned(), Some("containerd"), None))
        );
        assert_eq!(
            info(&format!("/machine.slice/crio-{ID}.scope")),
            Some((ID.to_owned(), Some("crio"), None))
        );
        assert_eq!(
            info(&format!("/machine.slice/libpod-{ID}.scope/container")),
            Some((ID.to_owned(), Some("podman"), None))
        );
        assert_eq!(
            info(&format!("/machine.slice/libpod-conmon-{ID}.scope")),
            None
        );
        assert_eq!(
            info(&format!("/machine.slice/crio-conmon-{ID}.scope")),
            None
        );
    }

    #[test]
    fn kubepods_systemd_driver_unescapes_the_pod_uid() {
        let escaped = POD.replace('-', "_");
        let path = format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{escaped}.slice/cri-containerd-{ID}.scope"
        );
        assert_eq!(
            info(&path),
            Some((ID.to_owned(), Some("containerd"), Some(POD.to_owned())))
        );
        let guaranteed = format!("/kubepods.slice/kubepods-pod{escaped}.slice/crio-{ID}.scope");
        assert_eq!(
            info(&guaranteed),
            Some((ID.to_owned(), Some("crio"), Some(POD.to_owned())))
        );
    }

    #[test]
    fn kubepods_cgroupfs_driver() {
        assert_eq!(
            info(&format!("/kubepods/burstable/pod{POD}/{ID}")),
            Some((ID.to_owned(), None, Some(POD.to_owned())))
        );
        assert_eq!(
            info(&format!("/kubepods/pod{POD}/{ID}")),
            Some((ID.to_owned(), None, Some(POD.to_owned())))
        );
        assert_eq!(
            info(&format!("/kubepods/besteffort/pod{POD}/crio-{ID}")),
            Some((ID.to_owned(), Some("crio"), Some(POD.to_owned())))
        );
        assert_eq!(info(&format!("/kubepods/burstable/pod{POD}")), None);
    }

    #[test]
    fn not_containers() {
        for path in [
            "/system.slice/nginx.service".to_owned(),
            format!("/system.slice/docker-{}.scope", &ID[..63]),
            format!("/system.slice/docker-{}.scope", ID.to_uppercase()),
            format!("/docker/{ID}x"),
            format!("/system.slice/runner.service/docker-{ID}.scope"),
            format!("/user.slice/docker/{ID}"),
            "/".to_owned(),
        ] {
            assert_eq!(info(&path), None, "{path}");
        }
    }
}
