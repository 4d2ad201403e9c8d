//! A bounded TCP transfer with a content check, run inside VM namespaces by the tests:
//! `serve ADDR --timeout S` accepts one connection and prints "BYTES SHA256" of what arrived;
//! `send ADDR --bytes N --timeout S` sends N deterministic pseudo-random bytes and prints the
//! same for what it sent.
use std::{
    io::{Read as _, Write as _},
    net::{TcpListener, TcpStream},
    time::{Duration, Instant},
};

use sha2::{Digest as _, Sha256};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let flag = |name: &str| -> Option<String> {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1).cloned())
    };
    let timeout = Duration::from_secs(flag("--timeout").map_or(Ok(30), |s| s.parse())?);
    let (Some(mode), Some(addr)) = (args.get(1), args.get(2)) else {
        return Err(
            "usage: nv-tcpcheck serve ADDR [--timeout S] | send ADDR --bytes N [--timeout S]"
                .into(),
        );
    };
    let mut hash = Sha256::new();
    let mut total = 0u64;
    match mode.as_str() {
        "serve" => {
            let listener = TcpListener::bind(addr)?;
            listener.set_nonblocking(true)?;
            let deadline = Instant::now() + timeout;
            let mut stream = loop {
                match listener.accept() {
                    Ok((s, _)) => break s,
                    Err(e)
                        if e.kind() == std::io::ErrorKind::WouldBlock
                            && Instant::now() < deadline =>
                    {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    Err(e) => return Err(e.into()),
                }
            };
            stream.set_nonblocking(false)?;
            stream.set_read_timeout(Some(timeout))?;
            let mut buf = vec![0u8; 1 << 16];
            loop {
                let n = stream.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                hash.update(&buf[..n]);
                total += n as u64;
            }
        }
        "send" => {
            let bytes: u64 = flag("--bytes").ok_or("--bytes is required")?.parse()?;
            let deadline = Instant::now() + timeout;
            let mut stream = loop {
                match TcpStream::connect_timeout(&addr.parse()?, Duration::from_secs(1)) {
                    Ok(s) => break s,
                    Err(_) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(100));
                    }
                    Err(e) => return Err(e.into()),
                }
            };
            stream.set_write_timeout(Some(timeout))?;
            let mut state = 0x9e37_79b9_7f4a_7c15u64;
            let mut buf = vec![0u8; 1 << 16];
            while total < bytes {
                for chunk in buf.chunks_mut(8) {
                    // xorshift64: cheap, deterministic, not compressible.
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    chunk.copy_from_slice(&state.to_le_bytes()[..chunk.len()]);
                }
                let n = usize::try_from((bytes - total).min(buf.len() as u64))?;
                stream.write_all(&buf[..n])?;
                hash.update(&buf[..n]);
                total += n as u64;
            }
            stream.shutdown(std::net::Shutdown::Write)?;
            let mut rest = Vec::new();
            let _ = stream.read_to_end(&mut rest);
        }
        other => return Err(format!("unknown mode {other}").into()),
    }
    println!("{total} {:x}", hash.finalize());
    Ok(())
}
