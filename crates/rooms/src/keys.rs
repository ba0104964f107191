//! The server's ed25519 signing key, kept in the data directory.

use std::path::Path;

use base64::Engine;
use ruma::signatures::Ed25519KeyPair;

/// Loads `signing.key` from `data_dir`, creating it on first run. The file
/// holds `ed25519 <version> <base64 PKCS#8 DER>`.
pub fn load_or_create(data_dir: &Path) -> Result<Ed25519KeyPair, String> {
    let path = data_dir.join("signing.key");
    let b64 = base64::engine::general_purpose::STANDARD;
    if path.exists() {
        let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut parts = text.split_whitespace();
        let (Some("ed25519"), Some(version), Some(der)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(format!("{}: not a Weft signing key", path.display()));
        };
        let der = b64.decode(der).map_err(|e| format!("{}: {e}", path.display()))?;
        return Ed25519KeyPair::from_der(&der, version.to_owned()).map_err(|e| format!("{}: {e}", path.display()));
    }
    let der = Ed25519KeyPair::generate();
    let version: String = {
        use rand::Rng;
        rand::thread_rng()
            .sample_iter(rand::distributions::Alphanumeric)
            .take(6)
            .map(char::from)
            .collect()
    };
    let text = format!("ed25519 {version} {}\n", b64.encode(&der));
    write_private(&path, &text).map_err(|e| format!("{}: {e}", path.display()))?;
    Ed25519KeyPair::from_der(&der, version).map_err(|e| format!("signing key: {e}"))
}

fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()
}
