//! X25519 key exchange for TLS termination, computed by aws-lc.
//!
//! Every full handshake pays one X25519 key generation and one agreement,
//! and they were a third of the proxy's CPU per new TLS connection with
//! ring's implementation. aws-lc's takes about two thirds of ring's time
//! here (40 against 62 µs for the pair), so the ingress's provider swaps
//! this one group and keeps ring for everything else. The rest of Skiff,
//! and kube's client, stay on ring alone: turning on rustls' own aws-lc
//! provider as well would leave rustls without a process default.

use aws_lc_rs::agreement::{self, EphemeralPrivateKey, PublicKey, UnparsedPublicKey};
use rustls::crypto::{ActiveKeyExchange, SharedSecret, SupportedKxGroup};
use rustls::{Error, NamedGroup, PeerMisbehaved};

/// The X25519 group (RFC 7748) as rustls negotiates it.
#[derive(Debug)]
pub struct X25519;

struct Exchange {
    private: EphemeralPrivateKey,
    public: PublicKey,
}

impl SupportedKxGroup for X25519 {
    fn start(&self) -> Result<Box<dyn ActiveKeyExchange>, Error> {
        let rng = aws_lc_rs::rand::SystemRandom::new();
        let private = EphemeralPrivateKey::generate(&agreement::X25519, &rng)
            .map_err(|_| Error::FailedToGetRandomBytes)?;
        let public = private
            .compute_public_key()
            .map_err(|_| Error::FailedToGetRandomBytes)?;
        Ok(Box::new(Exchange { private, public }))
    }

    fn name(&self) -> NamedGroup {
        NamedGroup::X25519
    }
}

impl ActiveKeyExchange for Exchange {
    fn complete(self: Box<Self>, peer_pub_key: &[u8]) -> Result<SharedSecret, Error> {
        // aws-lc refuses a key of the wrong length and a low-order point
        // (an all-zero secret), as RFC 8446 §7.4.2 asks.
        let peer = UnparsedPublicKey::new(&agreement::X25519, peer_pub_key);
        agreement::agree_ephemeral(
            self.private,
            peer,
            Error::from(PeerMisbehaved::InvalidKeyShare),
            |secret| Ok(SharedSecret::from(secret)),
        )
    }

    fn pub_key(&self) -> &[u8] {
        self.public.as_ref()
    }

    fn group(&self) -> NamedGroup {
        NamedGroup::X25519
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both sides derive the same secret, whichever implementation each
    /// side uses: ours must interoperate with ring's (and any client's).
    #[test]
    fn agrees_with_ring() {
        let ours = X25519.start().expect("start");
        let theirs = rustls::crypto::ring::kx_group::X25519
            .start()
            .expect("ring start");
        let their_pub = theirs.pub_key().to_vec();
        let our_pub = ours.pub_key().to_vec();
        let a = ours.complete(&their_pub).expect("ours");
        let b = theirs.complete(&our_pub).expect("theirs");
        assert_eq!(a.secret_bytes(), b.secret_bytes());
        assert_eq!(a.secret_bytes().len(), 32);
    }

    /// A short key and the all-zero point (order 1: the secret would be
    /// zero) are the peer's fault, not a panic or a weak secret.
    #[test]
    fn bad_peer_keys_are_refused() {
        for bad in [&[9u8; 31][..], &[0u8; 32][..], &[][..]] {
            let err = X25519
                .start()
                .expect("start")
                .complete(bad)
                .err()
                .expect("refused");
            assert_eq!(err, Error::PeerMisbehaved(PeerMisbehaved::InvalidKeyShare));
        }
    }
}
