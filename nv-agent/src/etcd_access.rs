//! How nv reaches etcd: its members' client URLs and, over TLS, the CA that signed their
//! certificates and this identity's certificate and key. Agents and nvctl connect the same
//! way; who they are is the certificate's CN (a host's is its `host_name`, the operator's
//! `nv-admin` in the README's layout), and etcd's roles say what each may write.
use std::{path::PathBuf, time::Duration};

use etcd_client::{Certificate, ConnectOptions, Identity, TlsOptions};

use crate::error::{Result, invalid};

/// The files of a TLS identity, as the operator names them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TlsFiles {
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

impl TlsFiles {
    /// The files named; an empty path names none.
    #[must_use]
    pub fn without_empty(self) -> TlsFiles {
        let named = |p: Option<PathBuf>| p.filter(|p| !p.as_os_str().is_empty());
        TlsFiles {
            ca: named(self.ca),
            cert: named(self.cert),
            key: named(self.key),
        }
    }
}

/// Endpoints and credentials, checked; the files are read once, when made.
#[derive(Clone)]
pub struct EtcdAccess {
    pub endpoints: Vec<String>,
    /// Whether the endpoints are `https://`.
    pub tls: bool,
    /// Whether this identity presents a certificate.
    pub authenticated: bool,
    options: ConnectOptions,
}

impl std::fmt::Debug for EtcdAccess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdAccess")
            .field("endpoints", &self.endpoints)
            .field("tls", &self.tls)
            .field("authenticated", &self.authenticated)
            .finish_non_exhaustive()
    }
}

/// Comma-separated URLs, as `etcd_endpoints` and `--etcd-endpoints` take them.
pub fn split_endpoints(list: &str) -> Vec<String> {
    list.split(',')
        .map(|u| u.trim().to_owned())
        .filter(|u| !u.is_empty())
        .collect()
}

impl EtcdAccess {
    /// Checks `endpoints` and `files` together (`key` names the config keys in errors, e.g.
    /// `etcd_ca_file` for the agent, `--etcd-ca-file` for nvctl) and reads the files.
    pub fn new(endpoints: Vec<String>, files: &TlsFiles, names: &KeyNames) -> Result<EtcdAccess> {
        if endpoints.is_empty() {
            return Err(invalid(format!("{} names no URL", names.endpoints)));
        }
        for url in &endpoints {
            if !(url.starts_with("http://") || url.starts_with("https://")) || url.len() < 10 {
                return Err(invalid(format!(
                    "etcd endpoint '{url}' is not a URL like https://10.1.0.1:2379"
                )));
            }
        }
        let tls = endpoints[0].starts_with("https://");
        if endpoints.iter().any(|u| u.starts_with("https://") != tls) {
            return Err(invalid(format!(
                "{} mixes http:// and https:// URLs: every member is reached the same way",
                names.endpoints
            )));
        }
        let options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            .with_keep_alive(Duration::from_secs(1), Duration::from_secs(2));
        if !tls {
            if let Some(given) = [
                (&files.ca, names.ca),
                (&files.cert, names.cert),
                (&files.key, names.key),
            ]
            .into_iter()
            .find_map(|(f, name)| f.as_ref().map(|_| name))
            {
                return Err(invalid(format!(
                    "{given} is for https:// endpoints, and {} are http://: give etcd's \
                     https:// URLs (recommended), or leave the TLS files out for a test cluster",
                    names.endpoints
                )));
            }
            return Ok(EtcdAccess {
                endpoints,
                tls,
                authenticated: false,
                options,
            });
        }
        let Some(ca) = &files.ca else {
            return Err(invalid(format!(
                "{} is needed with https:// endpoints: the CA certificate (PEM) that signed \
                 etcd's",
                names.ca
            )));
        };
        let identity = match (&files.cert, &files.key) {
            (Some(cert), Some(key)) => Some((cert, key)),
            (None, None) => None,
            (Some(_), None) => {
                return Err(invalid(format!(
                    "{} is given without {}: a certificate needs its key",
                    names.cert, names.key
                )));
            }
            (None, Some(_)) => {
                return Err(invalid(format!(
                    "{} is given without {}: a key needs its certificate",
                    names.key, names.cert
                )));
            }
        };
        let mut tls_options = TlsOptions::new().ca_certificate(Certificate::from_pem(pem(
            ca,
            names.ca,
            "CERTIFICATE",
        )?));
        if let Some((cert, key)) = identity {
            tls_options = tls_options.identity(Identity::from_pem(
                pem(cert, names.cert, "CERTIFICATE")?,
                pem(key, names.key, "PRIVATE KEY")?,
            ));
        }
        let authenticated = identity.is_some();
        Ok(EtcdAccess {
            endpoints,
            tls,
            authenticated,
            options: options.with_tls(tls_options),
        })
    }

    /// How every connection to etcd is made (the watcher's and the writer's).
    pub fn connect_options(&self) -> ConnectOptions {
        self.options.clone()
    }
}

/// The names of the settings, as the one who gave them wrote them.
pub struct KeyNames {
    pub endpoints: &'static str,
    pub ca: &'static str,
    pub cert: &'static str,
    pub key: &'static str,
}

/// The agent's config keys.
pub const CONFIG_KEYS: KeyNames = KeyNames {
    endpoints: "etcd_endpoints",
    ca: "etcd_ca_file",
    cert: "etcd_cert_file",
    key: "etcd_key_file",
};

/// nvctl's flags.
pub const FLAGS: KeyNames = KeyNames {
    endpoints: "--etcd-endpoints",
    ca: "--etcd-ca-file",
    cert: "--etcd-cert-file",
    key: "--etcd-key-file",
};

/// A PEM file's text, checked to hold a `what` block.
fn pem(path: &PathBuf, name: &str, what: &str) -> Result<String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| invalid(format!("{name} {}: {e}", path.display())))?;
    if !text.contains(&format!("-----BEGIN {what}")) && !text.contains(&format!(" {what}-----")) {
        return Err(invalid(format!(
            "{name} {} holds no PEM {what}",
            path.display()
        )));
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(dir: &std::path::Path, ca: bool, cert: bool, key: bool) -> TlsFiles {
        let write = |name: &str, text: &str| {
            let p = dir.join(name);
            std::fs::write(&p, text).unwrap();
            p
        };
        TlsFiles {
            ca: ca.then(|| {
                write(
                    "ca.pem",
                    "-----BEGIN CERTIFICATE-----\nMA==\n-----END CERTIFICATE-----\n",
                )
            }),
            cert: cert.then(|| {
                write(
                    "c.pem",
                    "-----BEGIN CERTIFICATE-----\nMA==\n-----END CERTIFICATE-----\n",
                )
            }),
            key: key.then(|| {
                write(
                    "k.pem",
                    "-----BEGIN PRIVATE KEY-----\nMA==\n-----END PRIVATE KEY-----\n",
                )
            }),
        }
    }

    fn err(endpoints: &[&str], f: &TlsFiles) -> String {
        let e = EtcdAccess::new(
            endpoints.iter().map(|s| (*s).to_owned()).collect(),
            f,
            &CONFIG_KEYS,
        )
        .expect_err("refused");
        e.to_string()
    }

    #[test]
    fn endpoints_and_files_are_checked_together() {
        let dir = std::env::temp_dir().join(format!("nv-etcd-access-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let none = TlsFiles::default();
        let plain =
            EtcdAccess::new(vec!["http://10.1.0.1:2379".into()], &none, &CONFIG_KEYS).unwrap();
        assert!(!plain.tls && !plain.authenticated);
        let all = files(&dir, true, true, true);
        let secure =
            EtcdAccess::new(vec!["https://10.1.0.1:2379".into()], &all, &CONFIG_KEYS).unwrap();
        assert!(secure.tls && secure.authenticated);
        assert!(err(&["http://a:1", "https://b:2"], &none).contains("mixes"));
        assert!(err(&["https://10.1.0.1:2379"], &none).contains("etcd_ca_file is needed"));
        assert!(err(&["http://10.1.0.1:2379"], &all).contains("is for https://"));
        assert!(
            err(&["https://10.1.0.1:2379"], &files(&dir, true, true, false))
                .contains("without etcd_key_file")
        );
        assert!(err(&["10.1.0.1:2379"], &none).contains("not a URL"));
        let mut wrong = files(&dir, true, true, true);
        std::fs::write(wrong.key.as_ref().unwrap(), "not a key").unwrap();
        assert!(err(&["https://10.1.0.1:2379"], &wrong).contains("holds no PEM PRIVATE KEY"));
        wrong.key = Some(dir.join("missing.pem"));
        assert!(err(&["https://10.1.0.1:2379"], &wrong).contains("missing.pem"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
