//! The server name a TLS client asks for, read from its ClientHello (RFC 8446 §4.1.2 and
//! RFC 6066 §3) as peeked from the socket: the bytes stay there for the server.

use std::time::Duration;

use tokio::{net::TcpStream, time::Instant};

/// The most of a ClientHello looked at: one TLS record.
const MAX_HELLO: usize = 5 + (16 << 10);
/// How often a client that sent too little is looked at again.
const PEEK_AGAIN: Duration = Duration::from_millis(2);

/// What a client's first bytes say of the server it wants.
#[derive(Debug, PartialEq, Eq)]
pub enum Hello {
    /// A ClientHello naming this host (lowercase).
    Sni(String),
    /// A ClientHello without a server name, or bytes that are no ClientHello.
    Unnamed,
    /// Too few bytes yet.
    Incomplete,
}

/// What `client` sends first within `wait`, peeked.
pub async fn server_name(client: &TcpStream, wait: Duration) -> Hello {
    let deadline = Instant::now() + wait;
    let mut first = vec![0u8; MAX_HELLO];
    loop {
        let n = match tokio::time::timeout_at(deadline, client.peek(&mut first)).await {
            Ok(Ok(n)) => n,
            Ok(Err(_)) | Err(_) => return Hello::Unnamed,
        };
        match parse(&first[..n]) {
            Hello::Incomplete if n > 0 && Instant::now() + PEEK_AGAIN <= deadline => {
                tokio::time::sleep(PEEK_AGAIN).await;
            }
            Hello::Incomplete => return Hello::Unnamed,
            hello => return hello,
        }
    }
}

/// Reads a ClientHello's server name from the start of a TLS stream.
pub fn parse(bytes: &[u8]) -> Hello {
    let mut r = Reader(bytes);
    let header = (|| {
        let content_type = r.u8()?;
        let _version = r.u16()?;
        let length = r.u16()?;
        Some((content_type, usize::from(length)))
    })();
    let Some((content_type, length)) = header else {
        return Hello::Incomplete;
    };
    // A handshake record; a record's length is at most 2^14 (+ 256 for a ciphertext).
    if content_type != 22 || length > (16 << 10) + 256 {
        return Hello::Unnamed;
    }
    let Some(record) = r.bytes(length) else {
        return Hello::Incomplete;
    };
    hello(record).map_or(Hello::Unnamed, |name| match name {
        Some(name) => Hello::Sni(name.to_ascii_lowercase()),
        None => Hello::Unnamed,
    })
}

/// The server name in a handshake record holding a ClientHello: `None` outer if it is none
/// (or split over records, which is not read), `None` inner if it names no server.
fn hello(record: &[u8]) -> Option<Option<String>> {
    let mut r = Reader(record);
    if r.u8()? != 1 {
        return None;
    }
    let length = r.u24()?;
    let mut body = Reader(r.bytes(length)?);
    body.bytes(2 + 32)?; // legacy_version, random
    let session_id = usize::from(body.u8()?);
    body.bytes(session_id)?;
    let suites = usize::from(body.u16()?);
    body.bytes(suites)?;
    let compression = usize::from(body.u8()?);
    body.bytes(compression)?;
    if body.0.is_empty() {
        return Some(None);
    }
    let extensions = usize::from(body.u16()?);
    let mut extensions = Reader(body.bytes(extensions)?);
    while !extensions.0.is_empty() {
        let kind = extensions.u16()?;
        let length = usize::from(extensions.u16()?);
        let data = extensions.bytes(length)?;
        if kind != 0 {
            continue;
        }
        let mut list = Reader(data);
        let list_length = usize::from(list.u16()?);
        let mut names = Reader(list.bytes(list_length)?);
        while !names.0.is_empty() {
            let name_type = names.u8()?;
            let length = usize::from(names.u16()?);
            let name = names.bytes(length)?;
            if name_type == 0 {
                return Some(Some(std::str::from_utf8(name).ok()?.to_owned()));
            }
        }
    }
    Some(None)
}

/// Big-endian reads off the front of a slice; `None` past its end.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }

    fn u8(&mut self) -> Option<u8> {
        Some(self.bytes(1)?[0])
    }

    fn u16(&mut self) -> Option<u16> {
        let b = self.bytes(2)?;
        Some(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u24(&mut self) -> Option<usize> {
        let b = self.bytes(3)?;
        Some(usize::from(b[0]) << 16 | usize::from(b[1]) << 8 | usize::from(b[2]))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use rustls::{ClientConfig, ClientConnection, RootCertStore, pki_types::ServerName};

    use super::*;

    /// The first bytes a rustls client sends for `name`.
    fn client_hello(name: &str) -> Vec<u8> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(RootCertStore::empty())
            .with_no_client_auth();
        let server = ServerName::try_from(name.to_owned()).unwrap();
        let mut client = ClientConnection::new(Arc::new(config), server).unwrap();
        let mut out = Vec::new();
        client.write_tls(&mut out).unwrap();
        out
    }

    #[test]
    fn a_client_hello_names_its_server() {
        let hello = client_hello("Api.Courier.example");
        assert_eq!(parse(&hello), Hello::Sni("api.courier.example".into()));
        // Any prefix of it is too short to tell.
        for n in [0, 3, 5, 40, hello.len() - 1] {
            assert_eq!(parse(&hello[..n]), Hello::Incomplete, "{n} bytes");
        }
    }

    #[test]
    fn an_address_is_no_server_name_and_other_bytes_are_no_hello() {
        // rustls sends no SNI for an IP address.
        assert_eq!(parse(&client_hello("198.18.0.9")), Hello::Unnamed);
        assert_eq!(parse(b"GET / HTTP/1.1\r\n\r\n"), Hello::Unnamed);
        // A handshake record whose message is not a ClientHello.
        assert_eq!(parse(&[22, 3, 1, 0, 4, 2, 0, 0, 0]), Hello::Unnamed);
    }
}
