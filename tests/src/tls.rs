//! Certificates for the TLS tests (filled in by the TLS harness).
