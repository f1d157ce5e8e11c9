//! The built-in CA: a root certificate and key on disk, issuing short-lived X.509 SVIDs with
//! rcgen. `portcullis ca init` creates it; the agent's `ca` identity source and
//! `portcullis ca issue` use it.

use std::{
    fs, io,
    io::Write as _,
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};

use super::{SpiffeId, validate_trust_domain};

pub const CA_CERT: &str = "ca.pem";
pub const CA_KEY: &str = "ca.key";
pub const SVID_CERT: &str = "svid.pem";
pub const SVID_KEY: &str = "svid.key";
/// How long a CA made by `ca init` is valid.
const CA_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// SVIDs start a minute in the past, for clocks that disagree a little.
const BACKDATE: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path} already exists; refusing to overwrite a CA key")]
    Exists { path: PathBuf },
    #[error("{path}: {message}")]
    Bad { path: PathBuf, message: String },
    #[error(
        "{path} is readable by group or others (mode {mode:o}); a key must be 0600 or stricter"
    )]
    KeyPermissions { path: PathBuf, mode: u32 },
    #[error("trust domain `{td}`: {source}")]
    TrustDomain {
        td: String,
        source: super::SpiffeIdError,
    },
    #[error("{id} is not in this CA's trust domain `{td}`")]
    ForeignId { id: String, td: String },
    #[error("issuing a certificate: {0}")]
    Rcgen(#[from] rcgen::Error),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> CaError + '_ {
    move |source| CaError::Io {
        path: path.to_owned(),
        source,
    }
}

/// A freshly issued SVID, PEM-encoded.
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
    pub cert_der: CertificateDer<'static>,
    pub key_der: PrivateKeyDer<'static>,
    pub not_after: SystemTime,
}

/// A certificate signed over someone else's key.
pub struct Signed {
    pub cert_pem: String,
    pub cert_der: CertificateDer<'static>,
    pub not_after: SystemTime,
    pub serial: String,
}

pub struct Ca {
    trust_domain: String,
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
}

fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    // Serial numbers must be unique per CA: 128 random bits are.
    if fs::File::open("/dev/urandom")
        .and_then(|mut f| io::Read::read_exact(&mut f, &mut bytes))
        .is_err()
    {
        let t = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        bytes = t.to_be_bytes();
    }
    bytes[0] &= 0x7f; // positive
    SerialNumber::from_slice(&bytes)
}

fn offset(t: SystemTime) -> time::OffsetDateTime {
    time::OffsetDateTime::from(t)
}

/// Writes a file with `mode`, creating it exclusively when `exclusive`.
pub fn write_file(path: &Path, data: &[u8], mode: u32, exclusive: bool) -> Result<(), CaError> {
    let mut opts = fs::OpenOptions::new();
    opts.write(true).mode(mode);
    if exclusive {
        opts.create_new(true);
    } else {
        opts.create(true).truncate(true);
    }
    let mut f = opts.open(path).map_err(|e| {
        if e.kind() == io::ErrorKind::AlreadyExists {
            CaError::Exists {
                path: path.to_owned(),
            }
        } else {
            CaError::Io {
                path: path.to_owned(),
                source: e,
            }
        }
    })?;
    f.write_all(data).map_err(io_err(path))?;
    // The mode given to open() is filtered by the umask; make it exact.
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(io_err(path))
}

/// Reads a private key file, refusing one that group or others can read.
pub fn read_key(path: &Path) -> Result<String, CaError> {
    let meta = fs::metadata(path).map_err(io_err(path))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(CaError::KeyPermissions {
            path: path.to_owned(),
            mode,
        });
    }
    fs::read_to_string(path).map_err(io_err(path))
}

impl Ca {
    /// Creates a new root for `trust_domain` in `dir`: `ca.pem` and `ca.key` (0600).
    pub fn init(trust_domain: &str, dir: &Path) -> Result<Self, CaError> {
        validate_trust_domain(trust_domain).map_err(|source| CaError::TrustDomain {
            td: trust_domain.to_owned(),
            source,
        })?;
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        // Path length 0: a certificate this CA signs can never sign another.
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "portcullis");
        dn.push(
            DnType::CommonName,
            format!("portcullis CA for {trust_domain}"),
        );
        params.distinguished_name = dn;
        params.subject_alt_names =
            vec![SanType::URI(format!("spiffe://{trust_domain}").try_into()?)];
        let now = SystemTime::now();
        params.not_before = offset(now - BACKDATE);
        params.not_after = offset(now + CA_LIFETIME);
        params.serial_number = Some(random_serial());
        let cert = params.self_signed(&key)?;
        let key_path = dir.join(CA_KEY);
        write_file(&key_path, key.serialize_pem().as_bytes(), 0o600, true)?;
        write_file(&dir.join(CA_CERT), cert.pem().as_bytes(), 0o644, false)?;
        Ok(Self {
            trust_domain: trust_domain.to_owned(),
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// Loads `ca.pem` and `ca.key` from `dir`.
    pub fn load(dir: &Path) -> Result<Self, CaError> {
        let cert_path = dir.join(CA_CERT);
        let key_path = dir.join(CA_KEY);
        let cert_pem = fs::read_to_string(&cert_path).map_err(io_err(&cert_path))?;
        let key = KeyPair::from_pem(&read_key(&key_path)?).map_err(|e| CaError::Bad {
            path: key_path.clone(),
            message: format!("not a private key: {e}"),
        })?;
        let der =
            CertificateDer::from_pem_slice(cert_pem.as_bytes()).map_err(|e| CaError::Bad {
                path: cert_path.clone(),
                message: format!("not a PEM certificate: {e}"),
            })?;
        let info = super::svid::ca_info(&der).map_err(|message| CaError::Bad {
            path: cert_path.clone(),
            message,
        })?;
        // A key and a certificate that do not belong together (caught mid-replacement, say)
        // would issue SVIDs nobody can verify.
        let spki = x509_parser::parse_x509_certificate(&der)
            .map(|(_, c)| c.tbs_certificate.subject_pki.raw.to_vec())
            .map_err(|e| CaError::Bad {
                path: cert_path.clone(),
                message: format!("not an X.509 certificate: {e}"),
            })?;
        if spki != rcgen::PublicKeyData::subject_public_key_info(&key) {
            return Err(CaError::Bad {
                path: key_path.clone(),
                message: format!("is not the key of {}", cert_path.display()),
            });
        }
        let issuer = Issuer::from_ca_cert_der(&der, key).map_err(|e| CaError::Bad {
            path: cert_path.clone(),
            message: e.to_string(),
        })?;
        Ok(Self {
            trust_domain: info,
            issuer,
            cert_pem,
        })
    }

    #[must_use]
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    #[must_use]
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Issues an SVID for `id`, valid for `ttl`, with a key made here.
    pub fn issue(&self, id: &SpiffeId, ttl: Duration) -> Result<Issued, CaError> {
        let key = KeyPair::generate()?;
        let signed = self.sign(id, &key, ttl)?;
        let key_der = PrivateKeyDer::try_from(key.serialize_der()).map_err(|e| CaError::Bad {
            path: PathBuf::from("<generated key>"),
            message: e.to_string(),
        })?;
        Ok(Issued {
            cert_pem: signed.cert_pem,
            key_pem: key.serialize_pem(),
            cert_der: signed.cert_der,
            key_der,
            not_after: signed.not_after,
        })
    }

    /// Signs an SVID for `id` over `public_key`, valid for `ttl`. Every field is set here:
    /// one URI SAN, not a CA, digital signature for TLS client and server.
    pub fn sign(
        &self,
        id: &SpiffeId,
        public_key: &impl rcgen::PublicKeyData,
        ttl: Duration,
    ) -> Result<Signed, CaError> {
        if id.trust_domain() != self.trust_domain {
            return Err(CaError::ForeignId {
                id: id.to_string(),
                td: self.trust_domain.clone(),
            });
        }
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.subject_alt_names = vec![SanType::URI(id.as_str().try_into()?)];
        params.use_authority_key_identifier_extension = true;
        let now = SystemTime::now();
        params.not_before = offset(now - BACKDATE);
        params.not_after = offset(now + ttl);
        let serial = random_serial();
        params.serial_number = Some(serial.clone());
        let cert = params.signed_by(public_key, &self.issuer)?;
        // X.509 times have one-second resolution: report what the certificate says.
        let not_after = SystemTime::UNIX_EPOCH
            + Duration::from_secs(u64::try_from(params.not_after.unix_timestamp()).unwrap_or(0));
        Ok(Signed {
            cert_pem: cert.pem(),
            cert_der: cert.der().clone(),
            not_after,
            serial: serial.to_string(),
        })
    }

    /// `ca issue`: writes `svid.pem` and `svid.key` (0600) for `id` into `dir`.
    pub fn issue_to(&self, id: &SpiffeId, ttl: Duration, dir: &Path) -> Result<Issued, CaError> {
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        let issued = self.issue(id, ttl)?;
        write_file(&dir.join(SVID_KEY), issued.key_pem.as_bytes(), 0o600, false)?;
        write_file(
            &dir.join(SVID_CERT),
            issued.cert_pem.as_bytes(),
            0o644,
            false,
        )?;
        Ok(issued)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::svid::check_chain;

    #[test]
    fn init_writes_a_private_key_and_issues_valid_svids() {
        let dir = tempfile::tempdir().unwrap();
        Ca::init("cluster.local", dir.path()).unwrap();
        let mode = fs::metadata(dir.path().join(CA_KEY))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
        assert!(
            matches!(
                Ca::init("cluster.local", dir.path()),
                Err(CaError::Exists { .. })
            ),
            "init must not overwrite a key"
        );

        let loaded = Ca::load(dir.path()).unwrap();
        assert_eq!(loaded.trust_domain(), "cluster.local");
        let id = SpiffeId::parse("spiffe://cluster.local/ns/default/sa/web").unwrap();
        let issued = loaded
            .issue_to(&id, Duration::from_secs(3600), &dir.path().join("web"))
            .unwrap();
        let info = check_chain(
            std::slice::from_ref(&issued.cert_der),
            "cluster.local",
            SystemTime::now(),
        )
        .unwrap();
        assert_eq!(info.id, id);
        assert!(info.not_after <= SystemTime::now() + Duration::from_secs(3600));
        let key_mode = fs::metadata(dir.path().join("web").join(SVID_KEY))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(key_mode, 0o600);

        let foreign = SpiffeId::parse("spiffe://other/ns/a/sa/b").unwrap();
        assert!(matches!(
            loaded.issue(&foreign, Duration::from_secs(60)),
            Err(CaError::ForeignId { .. })
        ));
    }

    #[test]
    fn a_key_of_another_ca_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        Ca::init("td", &a).unwrap();
        Ca::init("td", &b).unwrap();
        // Caught halfway through a replacement: b's key beside a's certificate.
        fs::copy(b.join(CA_KEY), a.join(CA_KEY)).unwrap();
        let e = Ca::load(&a).err().expect("a mismatched pair loaded");
        assert!(e.to_string().contains("is not the key of"), "{e}");
    }

    #[test]
    fn a_key_readable_by_others_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        Ca::init("td", dir.path()).unwrap();
        fs::set_permissions(dir.path().join(CA_KEY), fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            Ca::load(dir.path()),
            Err(CaError::KeyPermissions { mode: 0o644, .. })
        ));
    }
}
