//! Real Linux guests: Debian's kernel under QEMU (TCG), with a busybox initramfs that loads the
//! virtio-net modules, configures `eth0` from the kernel command line and then runs a shell on
//! the serial console, which the test drives. Each guest sits behind a tap port on a simulated
//! host, as a `libvirt` or `OpenStack` VM does; it is bounded in time and killed (by its pid) when
//! dropped, also when a test fails.
use std::{
    fs,
    io::{Read as _, Write as _},
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, Stdio},
    sync::{Arc, Condvar, Mutex, OnceLock},
    thread,
    time::{Duration, Instant},
};

use std::fmt::Write as _;

use anyhow::{Context as _, bail, ensure};

use crate::sys::run;

/// Loaded in this order: each needs the ones before it.
const MODULES: [&str; 8] = [
    "virtio_ring",
    "virtio",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "failover",
    "net_failover",
    "virtio_net",
];

/// The guest's PID 1. Parameters ride on the kernel command line (`nv.ip=`, `nv.mtu=`);
/// `nv.ip=dhcp` leaves `eth0` without an address, for [`Guest::dhcp`].
const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp
for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci failover net_failover virtio_net; do
  insmod /lib/modules/$m.ko || echo "@@FAILED insmod $m"
done
for a in $(cat /proc/cmdline); do
  case $a in
    nv.ip=*) IP=${a#nv.ip=} ;;
    nv.mtu=*) MTU=${a#nv.mtu=} ;;
  esac
done
ip link set lo up
ip link set eth0 up || echo "@@FAILED no eth0"
[ -n "$MTU" ] && ip link set eth0 mtu "$MTU"
[ "$IP" = dhcp ] || ip addr add "$IP" dev eth0
stty -echo
export PS1=''
echo "@@READY $(cat /sys/class/net/eth0/address) $(cat /sys/class/net/eth0/mtu)"
# A shell with the console as its controlling terminal, as a child: PID 1 must never exit.
while :; do
  setsid cttyhack sh
  echo "@@SHELL-EXITED $?"
done
"#;

/// busybox udhcpc's script (`-s`): configures what the lease says and prints it on one line.
const UDHCPC_SCRIPT: &str = r#"#!/bin/busybox sh
case "$1" in
  deconfig)
    ip addr flush dev "$interface"
    ip link set "$interface" up
    ;;
  bound|renew)
    ip addr flush dev "$interface"
    ip addr add "$ip/$mask" dev "$interface"
    [ -n "$mtu" ] && ip link set "$interface" mtu "$mtu"
    if [ -n "$staticroutes" ]; then
      set -- $staticroutes
      while [ $# -ge 2 ]; do
        ip route add "$1" via "$2" dev "$interface"
        shift 2
      done
    elif [ -n "$router" ]; then
      ip route add default via "${router%% *}" dev "$interface"
    fi
    echo "@@LEASE ip=$ip mask=$mask router=$router mtu=$mtu serverid=$serverid lease=$lease staticroutes=$staticroutes"
    ;;
esac
"#;

/// The kernel and initramfs every guest boots; built once per machine (rebuilt when the
/// init script changes).
#[derive(Clone, Debug)]
pub struct Image {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

/// Builds (or finds) the guest image under target/nv-guest.
pub fn image() -> anyhow::Result<Image> {
    static IMAGE: OnceLock<Result<Image, String>> = OnceLock::new();
    IMAGE
        .get_or_init(|| build_image().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(|e| anyhow::anyhow!("cannot build the guest image: {e}"))
}

fn build_image() -> anyhow::Result<Image> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/nv-guest");
    fs::create_dir_all(&dir)?;
    // The kernel whose modules are installed: Debian's linux-image-amd64.
    let version = fs::read_dir("/lib/modules")
        .context("no /lib/modules: `cargo xtask setup` installs linux-image-amd64")?
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|v| Path::new(&format!("/boot/vmlinuz-{v}")).exists())
        .max()
        .context("no kernel in /boot with modules in /lib/modules: `cargo xtask setup` installs linux-image-amd64")?;
    let kernel = PathBuf::from(format!("/boot/vmlinuz-{version}"));
    let busybox = PathBuf::from("/bin/busybox");
    ensure!(
        busybox.exists(),
        "no /bin/busybox: `cargo xtask setup` installs busybox-static"
    );
    let initrd = dir.join(format!(
        "initrd-{version}-{:016x}.cpio",
        fnv(format!("{INIT}{UDHCPC_SCRIPT}").as_bytes())
    ));
    if initrd.exists() {
        return Ok(Image { kernel, initrd });
    }
    let root = dir.join(format!("root-{}", std::process::id()));
    let _ = fs::remove_dir_all(&root);
    for d in ["bin", "lib/modules", "proc", "sys", "dev", "tmp"] {
        fs::create_dir_all(root.join(d))?;
    }
    fs::copy(&busybox, root.join("bin/busybox"))?;
    for m in MODULES {
        let path = run("modinfo", &["-n", "-k", &version, m])?;
        fs::copy(path.trim(), root.join(format!("lib/modules/{m}.ko")))
            .with_context(|| format!("copy module {m} from {}", path.trim()))?;
    }
    for (file, text) in [("init", INIT), ("bin/nv-udhcpc", UDHCPC_SCRIPT)] {
        fs::write(root.join(file), text)?;
        fs::set_permissions(root.join(file), fs::Permissions::from_mode(0o755))?;
    }
    // newc cpio of the tree; written aside and renamed, so parallel builders never see half.
    let partial = dir.join(format!("initrd-{}.partial", std::process::id()));
    let out = fs::File::create(&partial)?;
    let mut find = Command::new("find")
        .arg(".")
        .current_dir(&root)
        .stdout(Stdio::piped())
        .spawn()
        .context("run find")?;
    let status = Command::new("cpio")
        .args(["--quiet", "-o", "-H", "newc"])
        .current_dir(&root)
        .stdin(find.stdout.take().context("find's output")?)
        .stdout(out)
        .status()
        .context("run cpio (`cargo xtask setup` installs it)")?;
    find.wait()?;
    ensure!(status.success(), "cpio failed ({status})");
    fs::rename(&partial, &initrd)?;
    let _ = fs::remove_dir_all(&root);
    Ok(Image { kernel, initrd })
}

/// FNV-1a: names the initramfs after the init script it carries.
fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// How to boot one guest.
#[derive(Clone, Debug)]
pub struct Spec {
    /// For messages.
    pub name: String,
    /// The network namespace of the host, where the tap port is.
    pub host_ns: String,
    pub tap: String,
    pub mac: String,
    /// Address with prefix length, e.g. 10.0.0.11/24; `dhcp`: none until [`Guest::dhcp`].
    pub ip: String,
    /// The guest's MTU (the kernel's default, 1500, when `None`).
    pub mtu: Option<u32>,
}

/// What QEMU has written to the serial console so far.
#[derive(Default)]
struct Console {
    text: Mutex<String>,
    grew: Condvar,
}

/// A running guest.
pub struct Guest {
    pub spec: Spec,
    child: Child,
    stdin: ChildStdin,
    console: Arc<Console>,
    /// Console text before this offset has been consumed by `run`.
    read: usize,
    next: u64,
}

/// How long a guest may take to boot under TCG on a busy 2-core machine (about 6 s idle).
const BOOT_TIMEOUT: Duration = Duration::from_secs(90);
/// Bound on the whole life of a guest: QEMU is killed by this if nothing else stops it.
const LIFETIME: &str = "600";

impl Guest {
    /// Boots a guest on the existing tap `spec.tap` and waits until its shell is ready.
    pub fn boot(spec: Spec) -> anyhow::Result<Guest> {
        let image = image()?;
        let mut append = format!("console=ttyS0 quiet loglevel=1 panic=-1 nv.ip={}", spec.ip);
        if let Some(mtu) = spec.mtu {
            let _ = write!(append, " nv.mtu={mtu}");
        }
        let mut child = Command::new("ip")
            .args([
                "netns",
                "exec",
                &spec.host_ns,
                "timeout",
                "-s",
                "KILL",
                LIFETIME,
            ])
            .args([
                "qemu-system-x86_64",
                "-accel",
                "tcg",
                "-cpu",
                "max",
                "-m",
                "256",
            ])
            .args(["-smp", "1", "-nodefaults", "-no-reboot", "-display", "none"])
            .args(["-monitor", "none", "-serial", "stdio"])
            .arg("-kernel")
            .arg(&image.kernel)
            .arg("-initrd")
            .arg(&image.initrd)
            .args(["-append", &append])
            .args([
                "-netdev",
                &format!("tap,id=n0,ifname={},script=no,downscript=no", spec.tap),
                "-device",
                &format!("virtio-net-pci,netdev=n0,mac={}", spec.mac),
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("run qemu-system-x86_64 (`cargo xtask setup` installs qemu-system-x86)")?;
        let console = Arc::new(Console::default());
        for stream in [
            Box::new(child.stdout.take().context("qemu stdout")?) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().context("qemu stderr")?),
        ] {
            let console = console.clone();
            thread::spawn(move || pump(stream, &console));
        }
        let stdin = child.stdin.take().context("qemu stdin")?;
        let mut guest = Guest {
            spec,
            child,
            stdin,
            console,
            read: 0,
            next: 0,
        };
        let ready = guest.wait_for("@@READY", BOOT_TIMEOUT)?;
        let line = ready.lines().find(|l| l.contains("@@READY")).unwrap_or("");
        ensure!(
            line.contains(&guest.spec.mac.to_lowercase()),
            "{}: guest NIC is not {}: {line}",
            guest.spec.name,
            guest.spec.mac
        );
        if ready.contains("@@FAILED") {
            bail!("{}: guest init failed:\n{ready}", guest.spec.name);
        }
        // The shell's first command settles its start (banner, "job control turned off"); a
        // first command that starts a background job ended the shell, and the guest with it.
        guest.ok("true", Duration::from_secs(30))?;
        Ok(guest)
    }

    /// Waits until the console shows `marker` after what was consumed; returns the text up to
    /// and including its line.
    fn wait_for(&mut self, marker: &str, timeout: Duration) -> anyhow::Result<String> {
        let deadline = Instant::now() + timeout;
        let mut text = self.console.text.lock().expect("console lock");
        loop {
            // The marker's whole line: it ends what the command printed.
            if let Some(at) = text[self.read..].find(marker)
                && let Some(n) = text[self.read + at..].find('\n')
            {
                let end = self.read + at + n + 1;
                let out = text[self.read..end].to_owned();
                self.read = end;
                ensure!(
                    !out.contains("@@SHELL-EXITED"),
                    "{}: the guest's shell exited:\n{out}",
                    self.spec.name
                );
                return Ok(out);
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                bail!(
                    "{}: QEMU exited ({status}) waiting for {marker}; console:\n{}",
                    self.spec.name,
                    tail(&text)
                );
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!(
                    "{}: no {marker} in {timeout:?}; console:\n{}",
                    self.spec.name,
                    tail(&text)
                );
            }
            text = self
                .console
                .grew
                .wait_timeout(text, left.min(Duration::from_millis(200)))
                .expect("console lock")
                .0;
        }
    }

    /// Runs a shell command in the guest; returns its exit status and output.
    pub fn run(&mut self, cmd: &str, timeout: Duration) -> anyhow::Result<(i32, String)> {
        self.next += 1;
        let marker = format!("@@DONE{}", self.next);
        // The status after a marker of our own; console echo is off, so a match is output.
        writeln!(self.stdin, "{cmd}; echo \"{marker} $?\"")?;
        self.stdin.flush()?;
        let out = self.wait_for(&format!("{marker} "), timeout)?;
        let (body, last) = out
            .rsplit_once(&marker)
            .context("marker vanished from the output")?;
        let status = last.trim().parse().context("exit status")?;
        Ok((status, body.to_owned()))
    }

    /// Runs `cmd`, which must succeed; returns its output.
    pub fn ok(&mut self, cmd: &str, timeout: Duration) -> anyhow::Result<String> {
        let (status, out) = self.run(cmd, timeout)?;
        ensure!(
            status == 0,
            "{}: `{cmd}` exited {status}: {out}",
            self.spec.name
        );
        Ok(out)
    }

    /// Asks for a lease with busybox's `udhcpc` (`tries` discovers, 2 s apart), which
    /// configures `eth0` from it; returns the lease's line (`@@LEASE ip=... mask=...
    /// router=... mtu=... staticroutes=...`), or `None` when no server answered.
    pub fn dhcp(&mut self, tries: u32) -> anyhow::Result<Option<String>> {
        let (status, out) = self.run(
            &format!(
                "udhcpc -i eth0 -f -q -n -t {tries} -T 2 -A 1 -O mtu -O staticroutes -s /bin/nv-udhcpc"
            ),
            Duration::from_secs(u64::from(tries) * 3 + 30),
        )?;
        let lease = out
            .lines()
            .find(|l| l.contains("@@LEASE"))
            .map(str::to_owned);
        ensure!(
            (status == 0) == lease.is_some(),
            "{}: udhcpc exited {status}: {out}",
            self.spec.name
        );
        Ok(lease)
    }

    /// Pings `dst` from the guest (`count` requests, 0.2 s apart); returns the replies.
    pub fn ping(&mut self, dst: &str, count: u32) -> anyhow::Result<u32> {
        self.ping_sized(dst, count, 56)
    }

    /// As `ping`, with `size` bytes of ICMP payload.
    pub fn ping_sized(&mut self, dst: &str, count: u32, size: u32) -> anyhow::Result<u32> {
        let (_, out) = self.run(
            &format!("ping -c {count} -s {size} -i 0.2 -W 2 {dst}"),
            Duration::from_secs(u64::from(count) + 30),
        )?;
        let received = out
            .split(',')
            .find_map(|p| p.trim().strip_suffix("packets received"))
            .with_context(|| format!("unexpected ping output: {out}"))?;
        Ok(received.trim().parse()?)
    }

    /// Writes `bytes` random bytes to /tmp/out in the guest; returns "BYTES SHA256" of it.
    pub fn make_file(&mut self, bytes: u64) -> anyhow::Result<String> {
        ensure!(bytes.is_multiple_of(1024), "whole KiB only");
        let out = self.ok(
            &format!(
                "dd if=/dev/urandom of=/tmp/out bs=1024 count={} 2>/dev/null && sha256sum /tmp/out",
                bytes / 1024
            ),
            Duration::from_mins(1),
        )?;
        Ok(format!("{bytes} {}", digest_of(&out, "/tmp/out")?))
    }

    /// Sends /tmp/out by TCP to `dst:port`.
    pub fn send_file(&mut self, dst: &str, port: u16) -> anyhow::Result<()> {
        self.ok(
            &format!("timeout 120 nc {dst} {port} < /tmp/out"),
            Duration::from_secs(150),
        )?;
        Ok(())
    }

    /// Listens on `port` in the background; `received` then reports what arrived.
    pub fn listen(&mut self, port: u16) -> anyhow::Result<()> {
        self.ok(
            // Its standard input never ends: busybox nc quits once either side says EOF, and
            // an EOF sent first would stop the sender before it has sent everything.
            &format!("rm -f /tmp/in; (sleep 130 | timeout 120 nc -l -p {port} > /tmp/in &)"),
            Duration::from_secs(10),
        )?;
        Ok(())
    }

    /// Waits for the background listener to finish; returns "BYTES SHA256" of what arrived.
    pub fn received(&mut self) -> anyhow::Result<String> {
        let out = self.ok(
            "while pidof nc >/dev/null; do sleep 0.2; done; echo \"bytes $(wc -c < /tmp/in)\"; sha256sum /tmp/in",
            Duration::from_secs(150),
        )?;
        let bytes = out
            .lines()
            .find_map(|l| l.trim().strip_prefix("bytes "))
            .with_context(|| format!("no byte count in {out}"))?;
        Ok(format!("{} {}", bytes.trim(), digest_of(&out, "/tmp/in")?))
    }

    /// Stops QEMU (the guest powers off hard, as a killed VM does) and waits for it.
    pub fn stop(mut self) {
        self.kill();
    }

    fn kill(&mut self) {
        // `ip netns exec` execs `timeout` in place, which makes its own process group and
        // runs QEMU in it: the group of the pid we started holds exactly the two.
        let group = -self.child.id().cast_signed();
        // SAFETY: signalling the process group of the child we spawned.
        unsafe { libc::kill(group, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            thread::sleep(Duration::from_millis(20));
        }
        // SAFETY: as above.
        unsafe { libc::kill(group, libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        self.kill();
    }
}

fn pump(mut stream: Box<dyn std::io::Read + Send>, console: &Console) {
    let mut buf = [0u8; 4096];
    while let Ok(n) = stream.read(&mut buf) {
        if n == 0 {
            break;
        }
        let mut text = console.text.lock().expect("console lock");
        text.push_str(&String::from_utf8_lossy(&buf[..n]).replace('\r', ""));
        console.grew.notify_all();
    }
}

/// The console's last lines, kernel messages (a panic's trace) left out but for their first.
fn tail(text: &str) -> String {
    let mut lines: Vec<&str> = Vec::new();
    for l in text.lines() {
        let kernel = l.starts_with('[');
        if !kernel || lines.last().is_none_or(|p| !p.starts_with('[')) {
            lines.push(l);
        }
    }
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// The digest on sha256sum's line for `file`.
fn digest_of<'a>(text: &'a str, file: &str) -> anyhow::Result<&'a str> {
    text.lines()
        .find_map(|l| l.trim().strip_suffix(file)?.split_whitespace().next())
        .with_context(|| format!("no sha256sum of {file} in {text}"))
}

/// Creates a tap port `name` in the namespace `ns` (persistent, up), as libvirt does before it
/// starts QEMU.
pub fn create_tap(ns: &str, name: &str) -> anyhow::Result<()> {
    run(
        "ip",
        &["-n", ns, "tuntap", "add", "dev", name, "mode", "tap"],
    )?;
    run("ip", &["-n", ns, "link", "set", name, "up"])?;
    Ok(())
}
