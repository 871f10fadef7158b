//! The one inotify instance through which a task manager's cgroup-bound
//! tasks learn that their cgroup may have emptied or gone, and the waking of
//! only the waiters an event concerns. Instances are a per-uid resource
//! (`fs.inotify.max_user_instances`, 128 by default): one per task would,
//! at a hundred cgroup tasks, take every instance from the other processes
//! of writ's uid (root: systemd, udevd, the container runtime).

use std::collections::{HashMap, HashSet};
use std::ffi::{CStr, OsStr, OsString};
use std::mem::MaybeUninit;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt as _;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rustix::fs::inotify::{self, ReadFlags, WatchFlags};
use rustix::io::Errno;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::sync::Notify;

/// How often a waiter without a watch re-reads its cgroup.
pub(crate) const FALLBACK_INTERVAL: Duration = Duration::from_millis(100);

/// How long a waiter without a watch polls before it asks for one again:
/// the limit that refused it may have been raised, or watches freed, since.
pub(crate) const WATCH_RETRY_INTERVAL: Duration = Duration::from_secs(5);

/// Room for several events; one needs at most 16 bytes and a name of up to
/// 255 bytes with its NUL, rounded up.
const READ_BUFFER: usize = 4096;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// One per task manager, not per process: an `AsyncFd` belongs to the
/// runtime that registered it, and a process may run several agents, each
/// on its own runtime. The instance is made on first use (a writ that binds
/// no cgroup holds none) and again if its reader has ended (its runtime
/// shut down).
#[derive(Default)]
pub(crate) struct CgroupWatcher {
    current: Mutex<Option<Instance>>,
    warnings: Arc<Warnings>,
    /// Tests: this many more `watch` calls are refused, as if a limit had
    /// been reached.
    #[cfg(test)]
    refuse: std::sync::atomic::AtomicUsize,
}

struct Instance {
    shared: Arc<Shared>,
    reader: tokio::task::AbortHandle,
}

impl Drop for CgroupWatcher {
    fn drop(&mut self) {
        if let Some(instance) = lock(&self.current).take() {
            instance.reader.abort();
        }
    }
}

impl CgroupWatcher {
    /// Watches the cgroup at `dir`: its `cgroup.events` (every change of
    /// `populated` modifies it) and its parent directory (removing a cgroup
    /// signals nothing on its own files). None when that is impossible,
    /// warned about once per cause: the caller re-reads its cgroup every
    /// `FALLBACK_INTERVAL` instead. Must run inside a tokio runtime.
    pub(crate) fn watch(&self, dir: &Path) -> Option<CgroupWakeups> {
        #[cfg(test)]
        if self
            .refuse
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return None;
        }
        let shared = match self.instance() {
            Ok(shared) => shared,
            Err(e) => {
                self.warnings.once(Cause::Instance(e));
                return None;
            }
        };
        match shared.add(dir) {
            Ok(wakeups) => Some(wakeups),
            // The cgroup is gone already (or renamed): nothing to warn of,
            // and the caller's look at it says so.
            Err(Errno::NOENT | Errno::NOTDIR) => None,
            Err(e) => {
                self.warnings.once(Cause::Watch(e));
                None
            }
        }
    }

    /// Tests: refuse the next `n` watches.
    #[cfg(test)]
    pub(crate) fn refuse_watches(&self, n: usize) {
        self.refuse.store(n, Ordering::SeqCst);
    }

    /// Tests: how many inodes the instance watches now.
    #[cfg(test)]
    pub(crate) fn watched_inodes(&self) -> usize {
        lock(&self.current)
            .as_ref()
            .map_or(0, |instance| lock(&instance.shared.watches).by_wd.len())
    }

    fn instance(&self) -> Result<Arc<Shared>, Errno> {
        let mut current = lock(&self.current);
        if let Some(instance) = current.as_ref()
            && !instance.reader.is_finished()
        {
            return Ok(instance.shared.clone());
        }
        let fd = inotify::init(inotify::CreateFlags::CLOEXEC | inotify::CreateFlags::NONBLOCK)?;
        let fd = crate::sys::async_fd(fd, Interest::READABLE)
            .map_err(|e| Errno::from_io_error(&e).unwrap_or(Errno::IO))?;
        let shared = Arc::new(Shared {
            fd,
            watches: Mutex::default(),
            warnings: self.warnings.clone(),
        });
        let reader = tokio::spawn(read_events(shared.clone())).abort_handle();
        *current = Some(Instance {
            shared: shared.clone(),
            reader,
        });
        Ok(shared)
    }
}

/// What kept a cgroup from being watched; each is logged once.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
enum Cause {
    Instance(Errno),
    Watch(Errno),
    Read(Errno),
}

#[derive(Default)]
struct Warnings(Mutex<HashSet<Cause>>);

impl Warnings {
    fn once(&self, cause: Cause) {
        if !lock(&self.0).insert(cause) {
            return;
        }
        let polling = "tasks whose cgroups are not watched re-read them every 100 ms instead, and ask for a watch again every 5 s";
        match cause {
            Cause::Instance(e @ (Errno::MFILE | Errno::NFILE)) => tracing::warn!(
                error = %e,
                "cannot create the inotify instance that watches bound cgroups; {polling}: raise fs.inotify.max_user_instances (instances per uid) or writ's open-file limit"
            ),
            Cause::Instance(e) => tracing::warn!(
                error = %e,
                "cannot create the inotify instance that watches bound cgroups; {polling}"
            ),
            Cause::Watch(e @ Errno::NOSPC) => tracing::warn!(
                error = %e,
                "cannot watch a bound cgroup; {polling}: raise fs.inotify.max_user_watches (watches per uid)"
            ),
            Cause::Watch(e) => {
                tracing::warn!(error = %e, "cannot watch a bound cgroup; {polling}")
            }
            Cause::Read(e) => tracing::warn!(
                error = %e,
                "reading the inotify instance that watches bound cgroups failed; every waiter re-reads its cgroup every 100 ms until it succeeds"
            ),
        }
    }
}

struct Shared {
    fd: AsyncFd<OwnedFd>,
    watches: Mutex<Watches>,
    warnings: Arc<Warnings>,
}

#[derive(Default)]
struct Watches {
    by_wd: HashMap<i32, Watched>,
    next_waiter: u64,
}

/// The waiters on one watched inode, by the name in it whose events concern
/// them: a `cgroup.events` file's under the empty name (the kernel names
/// nothing in a file's events, and each concerns them all), a parent
/// directory's under their cgroup's name, so that removing one cgroup wakes
/// only its own waiters, not every one under the same parent.
#[derive(Default)]
struct Watched {
    waiters: HashMap<OsString, HashMap<u64, Arc<Waiter>>>,
}

impl Watched {
    fn every_waiter(&self) -> impl Iterator<Item = &Arc<Waiter>> {
        self.waiters.values().flat_map(HashMap::values)
    }
}

#[derive(Default)]
struct Waiter {
    /// `notify_one` keeps a permit when nobody awaits: a wake-up between a
    /// waiter's look at its cgroup and its await is not lost.
    notify: Notify,
    /// The kernel dropped one of its watches: it must watch again.
    lost: AtomicBool,
}

impl Waiter {
    fn wake(&self) {
        self.notify.notify_one();
    }
}

impl Shared {
    fn add(self: &Arc<Self>, dir: &Path) -> Result<CgroupWakeups, Errno> {
        // Held across the syscalls: the reader must not handle an
        // IN_IGNORED for a wd the kernel just handed out (the inode's watch
        // already existed) before this waiter is filed under it.
        let mut watches = lock(&self.watches);
        // The same inode watched twice has one wd, and adding a watch
        // replaces its mask unless MASK_ADD: one task's watch never
        // narrows another's.
        let events = inotify::add_watch(
            self.fd.get_ref(),
            dir.join("cgroup.events"),
            WatchFlags::MODIFY | WatchFlags::MASK_ADD,
        )?;
        let mut wds = vec![(events, OsString::new())];
        if let (Some(parent), Some(name)) = (dir.parent(), dir.file_name()) {
            let removed = WatchFlags::DELETE | WatchFlags::ONLYDIR | WatchFlags::MASK_ADD;
            match inotify::add_watch(self.fd.get_ref(), parent, removed) {
                Ok(wd) => wds.push((wd, name.to_owned())),
                Err(e) => {
                    if !watches.by_wd.contains_key(&events) {
                        let _ = inotify::remove_watch(self.fd.get_ref(), events);
                    }
                    return Err(e);
                }
            }
        }
        let id = watches.next_waiter;
        watches.next_waiter += 1;
        let waiter = Arc::new(Waiter::default());
        for (wd, name) in &wds {
            watches
                .by_wd
                .entry(*wd)
                .or_default()
                .waiters
                .entry(name.clone())
                .or_default()
                .insert(id, waiter.clone());
        }
        Ok(CgroupWakeups {
            shared: self.clone(),
            id,
            waiter,
            wds,
        })
    }

    fn dispatch(&self, wd: i32, flags: ReadFlags, name: Option<&CStr>) {
        let mut watches = lock(&self.watches);
        if flags.contains(ReadFlags::QUEUE_OVERFLOW) {
            // Events were dropped, nobody knows which: everyone looks.
            watches
                .by_wd
                .values()
                .flat_map(Watched::every_waiter)
                .for_each(|w| w.wake());
            return;
        }
        if flags.contains(ReadFlags::IGNORED) {
            // The watch is gone (its inode removed, or it was removed
            // here): its waiters watch again if they still wait, and the
            // wd is forgotten, as the kernel may hand it out again.
            if let Some(watched) = watches.by_wd.remove(&wd) {
                for waiter in watched.every_waiter() {
                    waiter.lost.store(true, Ordering::Release);
                    waiter.wake();
                }
            }
            return;
        }
        let Some(watched) = watches.by_wd.get(&wd) else {
            return;
        };
        match name {
            Some(name) => {
                let name = OsStr::from_bytes(name.to_bytes());
                if let Some(group) = watched.waiters.get(name) {
                    group.values().for_each(|w| w.wake());
                }
            }
            None => watched.every_waiter().for_each(|w| w.wake()),
        }
    }

    fn wake_everyone(&self) {
        lock(&self.watches)
            .by_wd
            .values()
            .flat_map(Watched::every_waiter)
            .for_each(|w| w.wake());
    }
}

/// Reads the instance's events for as long as it lives, waking the waiters
/// each concerns.
async fn read_events(shared: Arc<Shared>) {
    let mut buf = vec![MaybeUninit::<u8>::uninit(); READ_BUFFER];
    loop {
        // Only when the reactor is gone (its runtime shutting down): no
        // waiter is left to wake on it.
        let Ok(mut ready) = shared.fd.readable().await else {
            return;
        };
        // One reader until the queue is drained: a new one would drop the
        // events its predecessor had read but not yet returned.
        let mut reader = inotify::Reader::new(shared.fd.get_ref(), &mut buf);
        let failed = loop {
            match reader.next() {
                Ok(event) => shared.dispatch(event.wd(), event.events(), event.file_name()),
                Err(Errno::AGAIN) => {
                    ready.clear_ready();
                    break None;
                }
                Err(Errno::INTR) => {}
                Err(e) => break Some(e),
            }
        };
        if let Some(e) = failed {
            // Not expected of inotify; rather than spin on it, everyone
            // looks now and the reader tries again a moment later.
            shared.warnings.once(Cause::Read(e));
            shared.wake_everyone();
            drop(ready);
            tokio::time::sleep(FALLBACK_INTERVAL).await;
        }
    }
}

/// One waiter's watches on its cgroup; dropping it removes them, and the
/// kernel's watch too when no other waiter shares its inode.
pub(crate) struct CgroupWakeups {
    shared: Arc<Shared>,
    id: u64,
    waiter: Arc<Waiter>,
    wds: Vec<(i32, OsString)>,
}

impl CgroupWakeups {
    /// Resolves once the cgroup may have changed since this was made or
    /// last resolved. false: a watch was dropped by the kernel, and this
    /// will not resolve again; watch the cgroup anew.
    pub(crate) async fn changed(&self) -> bool {
        if self.waiter.lost.load(Ordering::Acquire) {
            return false;
        }
        self.waiter.notify.notified().await;
        !self.waiter.lost.load(Ordering::Acquire)
    }
}

impl Drop for CgroupWakeups {
    fn drop(&mut self) {
        let mut watches = lock(&self.shared.watches);
        for (wd, name) in &self.wds {
            let Some(watched) = watches.by_wd.get_mut(wd) else {
                continue;
            };
            let Some(group) = watched.waiters.get_mut(name) else {
                continue;
            };
            // Not filed there: the wd was dropped, and given to another
            // inode since, whose watch is not ours to remove.
            if group.remove(&self.id).is_none() {
                continue;
            }
            if group.is_empty() {
                watched.waiters.remove(name);
            }
            if watched.waiters.is_empty() {
                watches.by_wd.remove(wd);
                // Fails if the kernel dropped it already; either way it is gone.
                let _ = inotify::remove_watch(self.shared.fd.get_ref(), *wd);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    /// A directory with a `cgroup.events` stands in for a cgroup: inotify
    /// reports the same events for it, except that removing a real cgroup
    /// drops no watch on its files.
    fn fake_cgroup(dir: &Path) {
        std::fs::create_dir(dir).unwrap();
        std::fs::write(dir.join("cgroup.events"), "populated 1\n").unwrap();
    }

    /// Sibling cgroups `a` and `b` in a temporary directory (kept while the
    /// first value lives), and a watcher for them.
    fn two_fake_cgroups() -> (tempfile::TempDir, PathBuf, PathBuf, CgroupWatcher) {
        let tmp = tempfile::tempdir().unwrap();
        let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
        fake_cgroup(&a);
        fake_cgroup(&b);
        (tmp, a, b, CgroupWatcher::default())
    }

    async fn woken(wakeups: &CgroupWakeups) -> Option<bool> {
        tokio::time::timeout(Duration::from_millis(200), wakeups.changed())
            .await
            .ok()
    }

    #[tokio::test]
    async fn an_event_wakes_only_the_waiters_it_concerns() {
        let (_tmp, a, b, watcher) = two_fake_cgroups();
        let on_a = watcher.watch(&a).unwrap();
        let also_on_a = watcher.watch(&a).unwrap();
        let on_b = watcher.watch(&b).unwrap();

        std::fs::write(a.join("cgroup.events"), "populated 0\n").unwrap();
        assert_eq!(woken(&on_a).await, Some(true));
        assert_eq!(woken(&also_on_a).await, Some(true));
        assert_eq!(woken(&on_b).await, None);

        // The inode's one watch stays for the waiter still on it.
        drop(on_a);
        std::fs::write(a.join("cgroup.events"), "populated 1\n").unwrap();
        assert_eq!(woken(&also_on_a).await, Some(true));

        // Removing a wakes its waiter (its file's watch dropped), not b's,
        // under the same parent.
        std::fs::remove_dir_all(&a).unwrap();
        assert_eq!(woken(&also_on_a).await, Some(false));
        assert_eq!(woken(&on_b).await, None);
        drop(also_on_a);
        std::fs::write(b.join("cgroup.events"), "populated 0\n").unwrap();
        assert_eq!(woken(&on_b).await, Some(true));
    }

    /// A wake-up that comes while nobody awaits is kept for the next await.
    #[tokio::test]
    async fn a_change_before_the_await_is_not_lost() {
        let tmp = tempfile::tempdir().unwrap();
        let a = tmp.path().join("a");
        fake_cgroup(&a);
        let watcher = CgroupWatcher::default();
        let on_a = watcher.watch(&a).unwrap();
        std::fs::write(a.join("cgroup.events"), "populated 0\n").unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(woken(&on_a).await, Some(true));
    }

    /// After a queue overflow nobody knows what changed: every waiter
    /// looks. A dropped watch's wd is forgotten; a later waiter given the
    /// same number is filed afresh.
    #[tokio::test]
    async fn an_overflow_wakes_everyone_and_a_dropped_wd_is_forgotten() {
        let (_tmp, a, b, watcher) = two_fake_cgroups();
        let on_a = watcher.watch(&a).unwrap();
        let on_b = watcher.watch(&b).unwrap();
        on_a.shared.dispatch(-1, ReadFlags::QUEUE_OVERFLOW, None);
        assert_eq!(woken(&on_a).await, Some(true));
        assert_eq!(woken(&on_b).await, Some(true));

        let (events_wd, _) = on_a.wds[0];
        on_a.shared.dispatch(events_wd, ReadFlags::IGNORED, None);
        assert_eq!(woken(&on_a).await, Some(false));
        assert!(!lock(&on_a.shared.watches).by_wd.contains_key(&events_wd));
        assert_eq!(woken(&on_b).await, None);
        drop(on_a);
        let again = watcher.watch(&a).unwrap();
        std::fs::write(a.join("cgroup.events"), "populated 0\n").unwrap();
        assert_eq!(woken(&again).await, Some(true));
    }
}
