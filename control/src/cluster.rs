//! Local node processes on loopback: what the quickstart, the end-to-end tests and the
//! benchmarks run nodes with.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};

/// A running `nvmirror node` child process.
pub struct NodeProc {
    pub name: String,
    pub data_dir: PathBuf,
    pub control: String,
    pub replication: String,
    pub nbd: String,
    /// The NVMe/TCP address, where the node was started with `--nvmf`.
    pub nvmf: Option<String>,
    child: Option<Child>,
    /// Extra arguments it was started with, for restarts.
    extra: Vec<String>,
    bin: PathBuf,
}

impl NodeProc {
    /// Starts a node with ephemeral loopback ports and waits for its ready line.
    pub fn start(bin: &Path, name: &str, data_dir: &Path, extra: &[&str]) -> Result<NodeProc> {
        Self::start_on(bin, name, data_dir, "127.0.0.1", extra)
    }

    /// Starts a node whose replication address is on `host` (control and NBD stay on
    /// loopback), with ephemeral ports.
    pub fn start_on(bin: &Path, name: &str, data_dir: &Path, host: &str, extra: &[&str]) -> Result<NodeProc> {
        let mut n = NodeProc {
            name: name.to_string(),
            data_dir: data_dir.to_path_buf(),
            control: "127.0.0.1:0".into(),
            replication: format!("{host}:0"),
            nbd: "127.0.0.1:0".into(),
            nvmf: None,
            child: None,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            bin: bin.to_path_buf(),
        };
        n.spawn()?;
        Ok(n)
    }

    fn spawn(&mut self) -> Result<()> {
        let mut cmd = Command::new(&self.bin);
        cmd.arg("node")
            .arg("--name")
            .arg(&self.name)
            .arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--listen")
            .arg(&self.replication)
            .arg("--control")
            .arg(&self.control)
            .arg("--nbd")
            .arg(&self.nbd)
            .args(&self.extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.data_dir.with_extension("log"))
            .context("open node log")?;
        cmd.stderr(log);
        let mut child = cmd.spawn().with_context(|| format!("start {}", self.bin.display()))?;
        let stdout = child.stdout.take().expect("piped");
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            if let Some(Ok(line)) = lines.next() {
                let _ = tx.send(line);
            }
            // Keep draining so the child never blocks on a full pipe.
            for _ in lines {}
        });
        let line = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(l) => l,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                bail!("node {} did not become ready; see {}", self.name, self.data_dir.with_extension("log").display());
            }
        };
        let field = |k: &str| -> Result<String> {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(&format!("{k}=")).map(str::to_string))
                .ok_or_else(|| anyhow!("node ready line lacks {k}: {line}"))
        };
        self.control = field("control")?;
        self.replication = field("replication")?;
        self.nbd = field("nbd")?;
        self.nvmf = field("nvmf").ok();
        self.child = Some(child);
        Ok(())
    }

    /// SIGKILL, the way a site is lost.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, the way a service manager stops a node; waits up to `timeout` for it to
    /// exit (then kills it, and says so).
    pub fn terminate(&mut self, timeout: Duration) -> Result<std::process::ExitStatus> {
        let Some(mut c) = self.child.take() else { bail!("node {} is not running", self.name) };
        let pid = i32::try_from(c.id()).context("pid")?;
        // SAFETY: kill(2) on a child of this process, not yet reaped.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let started = std::time::Instant::now();
        loop {
            if let Some(status) = c.try_wait()? {
                return Ok(status);
            }
            if started.elapsed() > timeout {
                let _ = c.kill();
                let _ = c.wait();
                bail!("node {} did not exit within {timeout:?} of SIGTERM", self.name);
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Restarts a killed node on the same addresses and data dir.
    pub fn restart(&mut self) -> Result<()> {
        self.kill();
        // The ports were ours a moment ago; retry briefly while the kernel releases them.
        let mut last = None;
        for _ in 0..50 {
            match self.spawn() {
                Ok(()) => return Ok(()),
                Err(e) => last = Some(e),
            }
            thread::sleep(Duration::from_millis(100));
        }
        Err(last.expect("tried"))
    }

    /// Replaces the extra arguments the next [`NodeProc::restart`] starts the node with.
    pub fn set_args(&mut self, extra: &[&str]) {
        self.extra = extra.iter().map(|s| s.to_string()).collect();
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn log_path(&self) -> PathBuf {
        self.data_dir.with_extension("log")
    }
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        self.kill();
    }
}
