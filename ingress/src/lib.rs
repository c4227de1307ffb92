//! The Ingress controller: host/path HTTP(S) reverse proxy with TLS by SNI.
//! Not built yet.
