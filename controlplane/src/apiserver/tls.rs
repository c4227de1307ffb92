//! The HTTPS listener: TLS accept loop and client certificate identity.
