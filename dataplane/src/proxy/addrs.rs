//! Addresses by role (linkerd2-proxy's `ClientAddr`, `OrigDstAddr`), where
//! mixing two of them would be a security bug, not a typo: the inbound side
//! presents the certificate of the address it was reached on and checks the
//! client's certificate against the client's address; the outbound side
//! checks the server's certificate against the original destination.
use std::{
    fmt,
    net::{IpAddr, SocketAddr},
};

macro_rules! role {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub struct $name(pub SocketAddr);

        impl $name {
            /// The IP address.
            pub fn ip(&self) -> IpAddr {
                self.0.ip()
            }

            /// The port.
            pub fn port(&self) -> u16 {
                self.0.port()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }
    };
}

role!(
    /// The far end of an accepted connection: the application's socket at
    /// 18000, the remote data plane's socket at 18001. Its certificate must
    /// be valid for this address.
    ClientAddr
);
role!(
    /// Where a captured connection was going, as the client asked for it
    /// (`SO_ORIGINAL_DST`), and what the preamble carries.
    OrigDstAddr
);
role!(
    /// Our end of an accepted connection: the address the peer reached. At
    /// 18001 it names whose certificate we present, and the only pod we
    /// deliver to.
    LocalAddr
);
