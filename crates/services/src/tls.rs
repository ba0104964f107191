//! The certificate the doors' secure transports share: MQTT over TLS
//! (`mqtts`) and CoAP over DTLS (`coaps`). Either the operator's PEM pair
//! from the config, or a self-signed pair generated on first start into the
//! data directory (`tls/mqtt.crt`, `tls/mqtt.key`; the names predate the
//! CoAP door's use of it) and reused afterwards. Each door builds its own
//! TLS engine from the files.

use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use parking_lot::Mutex;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use weft_core::Config;

/// Where the generated certificate and key go, in the data directory.
pub const GENERATED_CERT: &str = "tls/mqtt.crt";
pub const GENERATED_KEY: &str = "tls/mqtt.key";

/// A certificate and key on disk.
#[derive(Debug, Clone)]
pub struct CertFiles {
    /// The PEM certificate (chain): the CA file for clients when it is
    /// self-signed.
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
    /// Whether the pair is the generated one (self-signed).
    pub self_signed: bool,
    /// Whether this call generated it.
    pub generated: bool,
}

/// Two doors starting at once must not both generate a pair.
static GENERATING: Mutex<()> = Mutex::new(());

/// The operator's `cert` and `key` (relative paths are in `data_dir`);
/// with neither given, the generated pair in `data_dir`, created first if
/// it does not exist yet. Only paths: reading and checking them is the
/// door's TLS engine's job. `Err` names what is missing.
pub fn cert_files(
    data_dir: &Path,
    cert: Option<&str>,
    key: Option<&str>,
    hosts: &[String],
) -> Result<CertFiles, String> {
    match (cert, key) {
        (Some(c), Some(k)) => Ok(CertFiles {
            cert_path: data_dir.join(c),
            key_path: data_dir.join(k),
            self_signed: false,
            generated: false,
        }),
        (None, None) => generated_pair(data_dir, hosts),
        _ => Err("both a certificate and a key are needed, or neither (then one is generated)".into()),
    }
}

/// The generated self-signed pair in `data_dir`, created first if it does
/// not exist yet, valid for `hosts` (plus `localhost` and `127.0.0.1`).
pub fn generated_pair(data_dir: &Path, hosts: &[String]) -> Result<CertFiles, String> {
    let _one_at_a_time = GENERATING.lock();
    let cert_path = data_dir.join(GENERATED_CERT);
    let key_path = data_dir.join(GENERATED_KEY);
    let generated = if cert_path.exists() && key_path.exists() {
        false
    } else {
        generate(&cert_path, &key_path, hosts)?;
        true
    };
    Ok(CertFiles {
        cert_path,
        key_path,
        self_signed: true,
        generated,
    })
}

/// The names a generated certificate is made for: the server name's host
/// and the hosts of the secure listeners (wildcard addresses name none).
pub fn certificate_hosts(config: &Config) -> Vec<String> {
    vec![
        host_of(&config.server_name),
        host_of(&config.mqtt.tls_listen),
        host_of(&config.coap.dtls_listen),
    ]
}

/// Reads a PEM certificate chain (leaf first) and private key (PKCS#8,
/// PKCS#1 or SEC1).
pub fn read_pem(
    cert_path: &Path,
    key_path: &Path,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), String> {
    let certs = CertificateDer::pem_file_iter(cert_path)
        .and_then(|i| i.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("reading the certificate {}: {e}", cert_path.display()))?;
    if certs.is_empty() {
        return Err(format!("no certificate in {}", cert_path.display()));
    }
    let key = PrivateKeyDer::from_pem_file(key_path)
        .map_err(|e| format!("reading the private key {}: {e}", key_path.display()))?;
    Ok((certs, key))
}

/// The host part of a `host[:port]` server name or listen address.
pub fn host_of(name: &str) -> String {
    if let Some(rest) = name.strip_prefix('[') {
        // [v6]:port
        return rest.split(']').next().unwrap_or(rest).to_owned();
    }
    match name.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') && port.chars().all(|c| c.is_ascii_digit()) => host.to_owned(),
        _ => name.to_owned(),
    }
}

/// Writes a new self-signed certificate (ECDSA P-256, which both rustls
/// and the DTLS engine take) and its key (mode 0600).
fn generate(cert_path: &Path, key_path: &Path, hosts: &[String]) -> Result<(), String> {
    let mut names: Vec<String> = Vec::new();
    for h in hosts.iter().map(String::as_str).chain(["localhost", "127.0.0.1"]) {
        // Wildcard listen addresses name no host.
        let unspecified = h.parse::<IpAddr>().is_ok_and(|ip| ip.is_unspecified());
        if !h.is_empty() && !unspecified && !names.iter().any(|n| n == h) {
            names.push(h.to_owned());
        }
    }
    let mut params = rcgen::CertificateParams::new(names).map_err(|e| format!("certificate names: {e}"))?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "weft MQTT (self-signed)");
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let key =
        rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|e| format!("generating a key: {e}"))?;
    let cert = params
        .self_signed(&key)
        .map_err(|e| format!("generating a certificate: {e}"))?;
    if let Some(dir) = cert_path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    }
    write_file(key_path, key.serialize_pem().as_bytes(), true)?;
    write_file(cert_path, cert.pem().as_bytes(), false)?;
    Ok(())
}

/// Writes via a temporary file and a rename, so a crash leaves no half file.
fn write_file(path: &Path, data: &[u8], private: bool) -> Result<(), String> {
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(if private { 0o600 } else { 0o644 });
    }
    #[cfg(not(unix))]
    let _ = private;
    let mut f = opts.open(&tmp).map_err(|e| format!("writing {}: {e}", tmp.display()))?;
    f.write_all(data)
        .and_then(|_| f.sync_all())
        .map_err(|e| format!("writing {}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| format!("writing {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_of_strips_ports() {
        assert_eq!(host_of("localhost:8008"), "localhost");
        assert_eq!(host_of("example.org"), "example.org");
        assert_eq!(host_of("127.0.0.1:8883"), "127.0.0.1");
        assert_eq!(host_of("[::1]:8883"), "::1");
        assert_eq!(host_of("::1"), "::1");
    }

    #[test]
    fn generates_once_then_reuses() {
        let dir = tempfile::tempdir().unwrap();
        let first = cert_files(dir.path(), None, None, &["mqtt.example.org".into()]).unwrap();
        assert!(first.generated && first.self_signed);
        let pem = std::fs::read(&first.cert_path).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join(GENERATED_KEY))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let (certs, _key) = read_pem(&first.cert_path, &first.key_path).unwrap();
        assert_eq!(certs.len(), 1);
        let second = cert_files(dir.path(), None, None, &[]).unwrap();
        assert!(!second.generated);
        assert_eq!(std::fs::read(&second.cert_path).unwrap(), pem);
        // Configured paths, relative to the data directory.
        let third = cert_files(dir.path(), Some(GENERATED_CERT), Some(GENERATED_KEY), &[]).unwrap();
        assert!(!third.generated && !third.self_signed);
        assert!(cert_files(dir.path(), Some(GENERATED_CERT), None, &[]).is_err());
        assert!(read_pem(&dir.path().join("missing.crt"), &third.key_path).is_err());
    }
}
