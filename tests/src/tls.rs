//! Throwaway certificate authorities and certificates (rcgen), written as
//! PEM files the way cert-manager mounts them.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// A certificate authority that signs server and client certificates.
pub struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    /// The CA certificate, PEM.
    pub pem: String,
}

/// A certificate and its key, PEM.
pub struct TestCert {
    /// The certificate.
    pub cert_pem: String,
    /// Its private key (PKCS#8).
    pub key_pem: String,
}

impl TestCa {
    /// A new CA called `name`.
    pub fn new(name: &str) -> anyhow::Result<Self> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key)?;
        Ok(Self {
            pem: cert.pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// A server certificate for `localhost` and `127.0.0.1`.
    pub fn server_cert(&self) -> anyhow::Result<TestCert> {
        self.leaf(
            "agentmesh test server",
            vec!["localhost".to_owned(), "127.0.0.1".to_owned()],
            ExtendedKeyUsagePurpose::ServerAuth,
        )
    }

    /// A client certificate called `name`.
    pub fn client_cert(&self, name: &str) -> anyhow::Result<TestCert> {
        self.leaf(name, Vec::new(), ExtendedKeyUsagePurpose::ClientAuth)
    }

    fn leaf(
        &self,
        name: &str,
        names: Vec<String>,
        usage: ExtendedKeyUsagePurpose,
    ) -> anyhow::Result<TestCert> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(names)?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![usage];
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(TestCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// Writes the CA certificate to `dir/file`.
    pub fn write(&self, dir: &Path, file: &str) -> anyhow::Result<PathBuf> {
        let path = dir.join(file);
        std::fs::write(&path, &self.pem)?;
        Ok(path)
    }
}

impl TestCert {
    /// Writes `dir/<stem>.crt` and `dir/<stem>.key`, replacing them the
    /// way a mounted Secret changes (write aside, then rename), and
    /// returns their paths.
    pub fn write(&self, dir: &Path, stem: &str) -> anyhow::Result<(PathBuf, PathBuf)> {
        let cert = dir.join(format!("{stem}.crt"));
        let key = dir.join(format!("{stem}.key"));
        for (path, pem) in [(&cert, &self.cert_pem), (&key, &self.key_pem)] {
            let aside = path.with_extension("tmp");
            std::fs::write(&aside, pem)?;
            std::fs::rename(&aside, path)?;
        }
        Ok((cert, key))
    }
}
