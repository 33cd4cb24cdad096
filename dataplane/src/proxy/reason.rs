//! Why a connection failed: one enum, one [`Reason::label`], used alike by
//! the counters, `/metrics`, the dumps and the log lines.
use std::{fmt, io};

/// Why a connection was refused or ended early.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Reason {
    /// Outbound: no original destination (the connection was not captured
    /// by us).
    NoOriginalDestination,
    /// A socket we could not make.
    Socket,
    /// We hold no certificate for the address we must speak for.
    NoCertificate,
    /// Inbound: no byte of a TLS handshake arrived within the first-bytes
    /// deadline (shorter than the handshake timeout).
    FirstBytesTimeout,
    /// Inbound: too many unauthenticated connections in flight (from this
    /// source, or in all): closed at once.
    Shed,
    /// The TLS handshake did not finish within `--handshake-timeout`.
    HandshakeTimeout,
    /// Inbound: the handshake finished but the preamble did not, within the
    /// same `--handshake-timeout`.
    PreambleTimeout,
    /// The peer did not negotiate our tunnel protocol (ALPN).
    NoAlpn,
    /// The peer presented no certificate.
    NoClientCertificate,
    /// The peer's certificate is not from our CA.
    UnknownCa,
    /// A certificate signature does not verify.
    BadSignature,
    /// The peer's certificate has expired.
    Expired,
    /// The peer's certificate is not valid yet.
    NotYetValid,
    /// Outbound: the server's certificate is not valid for the original
    /// destination.
    WrongName,
    /// Inbound: the client's certificate is not valid for its source address.
    ClientIpMismatch,
    /// A certificate we cannot use for another reason (a node CA speaking
    /// outside its name constraints among them).
    BadCertificate,
    /// Inbound: the client's certificate carries no well-formed SPIFFE ID.
    BadIdentity,
    /// The peer's SPIFFE ID is not the identity the API shows for the pod
    /// at its address.
    IdentityMismatch,
    /// No meshed pod is known at the peer's address.
    UnknownWorkload,
    /// Inbound: an authorization policy refuses the connection.
    PolicyDenied,
    /// Outbound: a Service with no ready endpoint.
    NoEndpoints,
    /// The peer sent a TLS alert.
    AlertReceived,
    /// The peer does not speak TLS 1.3 with our suites.
    IncompatiblePeer,
    /// The peer does not speak TLS at all.
    NotTls,
    /// Another TLS failure.
    TlsOther,
    /// Inbound: a preamble of another version.
    PreambleVersion,
    /// Inbound: a preamble longer than allowed.
    PreambleTooLong,
    /// Inbound: a malformed preamble.
    BadPreamble,
    /// Inbound: the stream ended inside the preamble.
    PreambleTruncated,
    /// Inbound: the preamble names another destination than this pod.
    NotThisPod,
    /// The peer was gone before we could look at it.
    Gone,
    /// The connect was refused.
    Refused,
    /// The connection was reset.
    Reset,
    /// The stream ended early.
    Eof,
    /// A socket-level timeout.
    Timeout,
    /// Another I/O error.
    Io,
    /// No byte moved either way for `--idle-timeout`.
    IdleTimeout,
    /// The connection's task went away before it recorded an outcome (the
    /// executor stopped).
    Closed,
}

impl Reason {
    /// A short, stable snake_case label.
    pub fn label(self) -> &'static str {
        match self {
            Reason::NoOriginalDestination => "no_original_destination",
            Reason::Socket => "socket",
            Reason::NoCertificate => "no_certificate",
            Reason::FirstBytesTimeout => "first_bytes_timeout",
            Reason::Shed => "shed",
            Reason::HandshakeTimeout => "handshake_timeout",
            Reason::PreambleTimeout => "preamble_timeout",
            Reason::NoAlpn => "no_alpn",
            Reason::NoClientCertificate => "no_client_certificate",
            Reason::UnknownCa => "unknown_ca",
            Reason::BadSignature => "bad_signature",
            Reason::Expired => "expired",
            Reason::NotYetValid => "not_yet_valid",
            Reason::WrongName => "wrong_name",
            Reason::ClientIpMismatch => "client_ip_mismatch",
            Reason::BadCertificate => "bad_certificate",
            Reason::BadIdentity => "bad_identity",
            Reason::IdentityMismatch => "identity_mismatch",
            Reason::UnknownWorkload => "unknown_workload",
            Reason::PolicyDenied => "policy_denied",
            Reason::NoEndpoints => "no_endpoints",
            Reason::AlertReceived => "alert_received",
            Reason::IncompatiblePeer => "incompatible_peer",
            Reason::NotTls => "not_tls",
            Reason::TlsOther => "tls_other",
            Reason::PreambleVersion => "preamble_version",
            Reason::PreambleTooLong => "preamble_too_long",
            Reason::BadPreamble => "bad_preamble",
            Reason::PreambleTruncated => "preamble_truncated",
            Reason::NotThisPod => "not_this_pod",
            Reason::Gone => "gone",
            Reason::Refused => "refused",
            Reason::Reset => "reset",
            Reason::Eof => "eof",
            Reason::Timeout => "timeout",
            Reason::Io => "io",
            Reason::IdleTimeout => "idle_timeout",
            Reason::Closed => "closed",
        }
    }

    /// The reason behind a TLS or socket error.
    pub fn of(e: &io::Error) -> Reason {
        use rustls::{CertificateError, Error as T};
        if let Some(t) = e.get_ref().and_then(|inner| inner.downcast_ref::<T>()) {
            return match t {
                T::NoCertificatesPresented => Reason::NoClientCertificate,
                T::InvalidCertificate(CertificateError::UnknownIssuer) => Reason::UnknownCa,
                T::InvalidCertificate(CertificateError::BadSignature) => Reason::BadSignature,
                T::InvalidCertificate(CertificateError::Expired | CertificateError::ExpiredContext { .. }) => {
                    Reason::Expired
                }
                T::InvalidCertificate(CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. }) => {
                    Reason::NotYetValid
                }
                T::InvalidCertificate(
                    CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
                ) => Reason::WrongName,
                T::InvalidCertificate(_) => Reason::BadCertificate,
                T::AlertReceived(_) => Reason::AlertReceived,
                T::PeerIncompatible(_) => Reason::IncompatiblePeer,
                T::InvalidMessage(_) => Reason::NotTls,
                T::NoApplicationProtocol => Reason::NoAlpn,
                _ => Reason::TlsOther,
            };
        }
        match e.kind() {
            io::ErrorKind::ConnectionRefused => Reason::Refused,
            io::ErrorKind::ConnectionReset => Reason::Reset,
            io::ErrorKind::UnexpectedEof => Reason::Eof,
            io::ErrorKind::TimedOut => Reason::Timeout,
            _ => Reason::Io,
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_and_socket_errors_get_their_reasons() {
        let e = io::Error::new(io::ErrorKind::InvalidData, rustls::Error::NoCertificatesPresented);
        assert_eq!(Reason::of(&e), Reason::NoClientCertificate);
        assert_eq!(Reason::of(&io::ErrorKind::ConnectionReset.into()), Reason::Reset);
        assert_eq!(Reason::of(&io::ErrorKind::Other.into()), Reason::Io);
    }

    #[test]
    fn labels_are_snake_case_and_distinct() {
        let all = [
            Reason::NoOriginalDestination,
            Reason::HandshakeTimeout,
            Reason::FirstBytesTimeout,
            Reason::Shed,
            Reason::PreambleTimeout,
            Reason::ClientIpMismatch,
            Reason::IdleTimeout,
            Reason::Closed,
        ];
        let labels: std::collections::BTreeSet<_> = all.iter().map(|r| r.label()).collect();
        assert_eq!(labels.len(), all.len());
        assert!(labels.iter().all(|l| l.chars().all(|c| c.is_ascii_lowercase() || c == '_')));
    }
}
