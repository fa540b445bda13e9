//! Matching a TLS server's certificate against TLSA records (RFC 6698 §2.1, RFC 7671,
//! RFC 7672 §3.1): a rustls [`ServerCertVerifier`] for `dane-check`.
//!
//! - DANE-EE (3): the hash (or the bytes) of the leaf certificate or of its public key must
//!   match; names and expiry are not checked (RFC 7672 §3.1.1).
//! - DANE-TA (2): a certificate of the chain the server sent must match; it becomes the only
//!   trust anchor, then the chain (signatures, validity) and the name are verified as usual.
//! - PKIX-TA / PKIX-EE (0, 1) are not used for SMTP.

use std::sync::{Arc, Mutex};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

use super::policy::{Tlsa, hex};

/// The selected data of a certificate (selector 0: all of it, 1: its public key info).
pub fn selected(cert_der: &[u8], selector: u8) -> Option<Vec<u8>> {
    match selector {
        0 => Some(cert_der.to_vec()),
        1 => {
            let (_, c) = x509_parser::parse_x509_certificate(cert_der).ok()?;
            Some(c.tbs_certificate.subject_pki.raw.to_vec())
        }
        _ => None,
    }
}

/// The association data of `data` for a matching type (0: itself, 1: SHA-256, 2: SHA-512).
pub fn associate(data: &[u8], matching: u8) -> Option<Vec<u8>> {
    use ring::digest;
    match matching {
        0 => Some(data.to_vec()),
        1 => Some(digest::digest(&digest::SHA256, data).as_ref().to_vec()),
        2 => Some(digest::digest(&digest::SHA512, data).as_ref().to_vec()),
        _ => None,
    }
}

/// Whether a certificate matches a record's selector and matching type.
pub fn matches(cert_der: &[u8], t: &Tlsa) -> bool {
    selected(cert_der, t.selector)
        .and_then(|s| associate(&s, t.matching))
        .is_some_and(|a| a == t.data)
}

/// What the verifier saw, for the report.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Seen {
    /// The record that matched (`3 1 1 …`), if one did.
    pub matched: Option<String>,
    /// Why the certificate was refused, if it was.
    pub error: Option<String>,
    /// SHA-256 of the leaf's public key (what a `3 1 1` record must hold).
    pub leaf_spki_sha256: Option<String>,
    /// SHA-256 of the leaf certificate (`3 0 1`).
    pub leaf_cert_sha256: Option<String>,
    /// Subject of the leaf.
    pub leaf_subject: Option<String>,
    /// Certificates the server sent.
    pub chain_len: usize,
}

/// A rustls verifier that accepts exactly what the TLSA records allow.
#[derive(Debug)]
pub struct DaneVerifier {
    records: Vec<Tlsa>,
    provider: Arc<rustls::crypto::CryptoProvider>,
    seen: Arc<Mutex<Seen>>,
}

impl DaneVerifier {
    /// A verifier for these records (only the usable ones are consulted); what it saw is
    /// written to `seen`.
    pub fn new(records: Vec<Tlsa>, seen: Arc<Mutex<Seen>>) -> DaneVerifier {
        DaneVerifier {
            records: records
                .into_iter()
                .filter(|t| t.unusable().is_none())
                .collect(),
            provider: Arc::new(rustls::crypto::ring::default_provider()),
            seen,
        }
    }

    fn check(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        now: UnixTime,
    ) -> Result<String, String> {
        for t in self.records.iter().filter(|t| t.usage == 3) {
            if matches(end_entity, t) {
                return Ok(t.display());
            }
        }
        let mut ta_errors = Vec::new();
        for t in self.records.iter().filter(|t| t.usage == 2) {
            for ca in intermediates.iter().filter(|c| matches(c, t)) {
                match verify_chain(
                    end_entity,
                    intermediates,
                    ca,
                    server_name,
                    now,
                    &self.provider,
                ) {
                    Ok(()) => return Ok(t.display()),
                    Err(e) => ta_errors.push(format!("{}: {e}", t.display())),
                }
            }
        }
        if self.records.is_empty() {
            return Err("no usable TLSA record to match".into());
        }
        if !ta_errors.is_empty() {
            return Err(format!(
                "a DANE-TA record matched a certificate of the chain, but the chain failed: {}",
                ta_errors.join("; ")
            ));
        }
        Err("the certificate matches no TLSA record (key or certificate changed without updating TLSA?)".into())
    }
}

fn verify_chain(
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    anchor: &CertificateDer<'_>,
    server_name: &ServerName<'_>,
    now: UnixTime,
    provider: &rustls::crypto::CryptoProvider,
) -> Result<(), String> {
    let anchor =
        webpki::anchor_from_trusted_cert(anchor).map_err(|e| format!("trust anchor: {e}"))?;
    let ee = webpki::EndEntityCert::try_from(end_entity).map_err(|e| format!("leaf: {e}"))?;
    ee.verify_for_usage(
        provider.signature_verification_algorithms.all,
        &[anchor],
        intermediates,
        now,
        webpki::KeyUsage::server_auth(),
        None,
        None,
    )
    .map_err(|e| format!("chain: {e}"))?;
    ee.verify_is_valid_for_subject_name(server_name)
        .map_err(|e| format!("name: {e}"))
}

impl ServerCertVerifier for DaneVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let result = self.check(end_entity, intermediates, server_name, now);
        if let Ok(mut seen) = self.seen.lock() {
            seen.chain_len = 1 + intermediates.len();
            seen.leaf_spki_sha256 = selected(end_entity, 1)
                .and_then(|s| associate(&s, 1))
                .map(|h| hex(&h));
            seen.leaf_cert_sha256 = associate(end_entity, 1).map(|h| hex(&h));
            seen.leaf_subject = x509_parser::parse_x509_certificate(end_entity)
                .ok()
                .map(|(_, c)| c.subject().to_string());
            match &result {
                Ok(m) => seen.matched = Some(m.clone()),
                Err(e) => seen.error = Some(e.clone()),
            }
        }
        result
            .map(|_| ServerCertVerified::assertion())
            .map_err(|e| rustls::Error::General(format!("DANE: {e}")))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
