//! Network namespaces as RAII guards.
use std::{fs::File, os::fd::AsRawFd as _};

use anyhow::Context as _;

use crate::sys::run;

/// A named network namespace (`ip netns add`), deleted on drop.
#[derive(Debug)]
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(name: &str) -> anyhow::Result<Netns> {
        run("ip", &["netns", "add", name])?;
        let ns = Netns {
            name: name.to_owned(),
        };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// `ip -n NAME ARGS...`
    pub fn ip(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    /// `ip netns exec NAME PROGRAM ARGS...` (for VM-side tools; agents use `nsenter`).
    pub fn exec(&self, program: &str, args: &[&str]) -> anyhow::Result<String> {
        let mut all = vec!["netns", "exec", &self.name, program];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    /// The same as `exec`, returning the raw output whatever the exit status.
    pub fn exec_output(
        &self,
        program: &str,
        args: &[&str],
    ) -> anyhow::Result<std::process::Output> {
        let mut all = vec!["netns", "exec", &self.name, program];
        all.extend_from_slice(args);
        crate::sys::output("ip", &all)
    }

    pub fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }

    /// Moves the calling thread into this namespace (for `BPF_PROG_TEST_RUN` device lookups).
    pub fn enter_current_thread(&self) -> anyhow::Result<()> {
        enter_path(&self.path())
    }

    /// The ifindex of a link inside the namespace.
    pub fn ifindex(&self, link: &str) -> anyhow::Result<u32> {
        let out = self.exec("cat", &[&format!("/sys/class/net/{link}/ifindex")])?;
        out.trim()
            .parse()
            .with_context(|| format!("ifindex of {link}"))
    }

    /// The MAC address of a link inside the namespace.
    pub fn mac(&self, link: &str) -> anyhow::Result<[u8; 6]> {
        let out = self.exec("cat", &[&format!("/sys/class/net/{link}/address")])?;
        Ok(out.trim().parse::<nv_agent::model::Mac>()?.0)
    }
}

/// Moves the calling thread into the namespace at `path` (a thread that holds no [`Netns`]).
pub fn enter_path(path: &str) -> anyhow::Result<()> {
    let f = File::open(path).with_context(|| format!("open {path}"))?;
    // SAFETY: setns on a valid namespace fd; affects only the calling thread.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error()).context("setns");
    }
    Ok(())
}

/// Runs `f` on a thread of its own inside the namespace at `path` and returns its result: for
/// work that names devices of that namespace (TCX attaches by name) without moving the caller.
pub fn on_thread_in<T: Send + 'static>(
    path: String,
    f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    let name = path.clone();
    std::thread::spawn(move || {
        enter_path(&path)?;
        f()
    })
    .join()
    .map_err(|_| anyhow::anyhow!("a thread in {name} panicked"))?
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = run("ip", &["netns", "del", &self.name]);
    }
}
