//! systemd attestor: the unit and slice a process runs in, read from its
//! cgroup path the way systemd lays it out (slices, then one unit, then
//! whatever the unit itself creates, which may be delegated and untrusted).

use crate::attestor::Attestor;
use crate::cgroup::TrustedRoots;
use crate::error::AttestError;
use crate::process::PinnedProcess;
use crate::selector::Selector;
use crate::snapshot::ProcessSnapshot;

/// Unit types that own a cgroup of their own (slices aside).
const UNIT_SUFFIXES: [&str; 5] = ["service", "scope", "socket", "mount", "swap"];
const UNIT_NAME_MAX: usize = 255;

/// Where a cgroup path sits in systemd's tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SystemdPlacement<'a> {
    /// The leading run of `*.slice` components, e.g.
    /// `/kubepods.slice/kubepods-burstable.slice`; empty if there is none.
    pub slice_chain: &'a str,
    /// The first component after the slices, if it is a unit name.
    pub unit: Option<&'a str>,
}

impl<'a> SystemdPlacement<'a> {
    /// The innermost slice; units directly under the root are in `-.slice`.
    pub fn slice(&self) -> Option<&'a str> {
        match self.slice_chain.rsplit('/').next() {
            Some(last) if !last.is_empty() => Some(last),
            _ => self.unit.map(|_| "-.slice"),
        }
    }

    pub fn slices(&self) -> impl DoubleEndedIterator<Item = &'a str> {
        self.slice_chain.split('/').filter(|c| !c.is_empty())
    }
}

/// The unit is the *first* non-slice component, not the last: below a unit
/// (`Delegate=yes` services, container runtimes) the unit's own processes may
/// create cgroups, and a nested `.../foo.service/x.service` must not let them
/// claim to be `x.service`.
pub fn systemd_placement(path: &str) -> SystemdPlacement<'_> {
    let mut chain_end = 0;
    let mut unit = None;
    let mut offset = 0;
    for component in path.split('/').skip(1) {
        offset += 1 + component.len();
        if is_unit_name(component, &["slice"]) {
            chain_end = offset;
            continue;
        }
        if is_unit_name(component, &UNIT_SUFFIXES) {
            unit = Some(component);
        }
        break;
    }
    SystemdPlacement {
        slice_chain: &path[..chain_end],
        unit,
    }
}

/// systemd's unit-name grammar: `prefix.suffix`, the prefix from
/// `[A-Za-z0-9:_.\-@\\]`, at most 255 bytes in all.
fn is_unit_name(name: &str, suffixes: &[&str]) -> bool {
    if name.len() > UNIT_NAME_MAX {
        return false;
    }
    let Some((prefix, suffix)) = name.rsplit_once('.') else {
        return false;
    };
    !prefix.is_empty()
        && suffixes.contains(&suffix)
        && prefix
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b":_.-@\\".contains(&b))
}

#[derive(Debug, Clone)]
pub struct SystemdAttestor {
    roots: TrustedRoots,
}

impl SystemdAttestor {
    pub fn new(roots: TrustedRoots) -> Self {
        Self { roots }
    }
}

impl Attestor for SystemdAttestor {
    fn name(&self) -> &'static str {
        "systemd"
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
        let placement = systemd_placement(path);
        if let Some(unit) = placement.unit {
            out.push(Selector::with_key("systemd", "unit", unit));
        }
        if let Some(slice) = placement.slice() {
            out.push(Selector::with_key("systemd", "slice", slice));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unit_and_slice(path: &str) -> (Option<&str>, Option<&str>) {
        let p = systemd_placement(path);
        (p.unit, p.slice())
    }

    #[test]
    fn service_in_system_slice() {
        assert_eq!(
            unit_and_slice("/system.slice/nginx.service"),
            (Some("nginx.service"), Some("system.slice"))
        );
        assert_eq!(
            unit_and_slice("/system.slice/getty@tty1.service"),
            (Some("getty@tty1.service"), Some("system.slice"))
        );
    }

    #[test]
    fn nested_slices_take_the_innermost() {
        let path = "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1_2.slice/cri-containerd-ab.scope";
        assert_eq!(
            unit_and_slice(path),
            (
                Some("cri-containerd-ab.scope"),
                Some("kubepods-burstable-pod1_2.slice")
            )
        );
        let placement = systemd_placement(path);
        assert_eq!(placement.slices().next(), Some("kubepods.slice"));
        assert_eq!(placement.slices().count(), 3);
    }

    #[test]
    fn cgroups_inside_a_unit_cannot_rename_it() {
        assert_eq!(
            unit_and_slice("/system.slice/runner.service/system.slice/sshd.service"),
            (Some("runner.service"), Some("system.slice"))
        );
        assert_eq!(
            unit_and_slice("/system.slice/docker-ab.scope/init.scope"),
            (Some("docker-ab.scope"), Some("system.slice"))
        );
    }

    #[test]
    fn slices_without_unit_and_non_systemd_layouts() {
        assert_eq!(
            unit_and_slice("/system.slice"),
            (None, Some("system.slice"))
        );
        assert_eq!(
            unit_and_slice("/init.scope"),
            (Some("init.scope"), Some("-.slice"))
        );
        assert_eq!(unit_and_slice("/docker/abc"), (None, None));
        assert_eq!(unit_and_slice("/kubepods/burstable/pod1/abc"), (None, None));
        assert_eq!(unit_and_slice("/"), (None, None));
        assert_eq!(
            unit_and_slice("/system.slice/x.timer"),
            (None, Some("system.slice"))
        );
        assert_eq!(
            unit_and_slice("/system.slice/.service"),
            (None, Some("system.slice"))
        );
        assert_eq!(
            unit_and_slice("/system.slice/a b.service"),
            (None, Some("system.slice"))
        );
    }
}
