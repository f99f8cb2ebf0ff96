//! Long jobs beside a serving driver (a backup of the whole database) on a thread of their own
//! that yields to the driver: a lower CPU priority (nice +10) and the lowest best-effort I/O
//! priority, so that on a small machine the commits and sessions keep their share of the CPU
//! and the disk while the job runs, and the job still finishes under constant load (it is not
//! in the idle I/O class, which load could starve).

use tokio::sync::oneshot;

/// Runs `job` on a new low-priority thread named `name`; the receiver gets its result (or an
/// error if the thread could not start or the job panicked).
pub fn run<T: Send + 'static>(
    name: &str,
    job: impl FnOnce() -> T + Send + 'static,
) -> oneshot::Receiver<T> {
    let (tx, rx) = oneshot::channel();
    let spawned = std::thread::Builder::new()
        .name(name.to_string())
        .spawn(move || {
            lower_this_threads_priority();
            let _ = tx.send(job());
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start a background thread");
    }
    rx
}

/// Lowers the calling thread's CPU and I/O priority (Linux: both apply per thread). Failing
/// is not an error: the job then runs at normal priority.
#[allow(unsafe_code)]
fn lower_this_threads_priority() {
    #[cfg(target_os = "linux")]
    {
        const NICE: libc::c_int = 10;
        /// `IOPRIO_CLASS_BE << IOPRIO_CLASS_SHIFT | 7`: best effort, its lowest level.
        const IOPRIO_BE_LOWEST: libc::c_long = (2 << 13) | 7;
        const IOPRIO_WHO_PROCESS: libc::c_long = 1;
        // SAFETY: plain system calls on the calling thread (tid 0 / who 0), no memory passed.
        unsafe {
            let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
            libc::setpriority(libc::PRIO_PROCESS, tid, NICE);
            libc::syscall(
                libc::SYS_ioprio_set,
                IOPRIO_WHO_PROCESS,
                0 as libc::c_long,
                IOPRIO_BE_LOWEST,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn a_job_runs_and_its_result_comes_back() {
        let rx = super::run("test-job", || 6 * 7);
        assert_eq!(rx.await.unwrap(), 42);
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn the_job_runs_niced_and_the_caller_does_not() {
        #[allow(unsafe_code)]
        fn nice_of_this_thread() -> i32 {
            // SAFETY: reads the calling thread's priority.
            unsafe {
                let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
                libc::getpriority(libc::PRIO_PROCESS, tid)
            }
        }
        let before = nice_of_this_thread();
        let inside = super::run("test-nice", nice_of_this_thread).await.unwrap();
        assert_eq!(inside, (before + 10).min(19));
        assert_eq!(nice_of_this_thread(), before);
    }
}
