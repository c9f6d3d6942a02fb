//! Protocol detection for `auto` ports: the client's first bytes, peeked (left in the socket),
//! say HTTP/1 (a request line's method and a space) or HTTP/2 (its connection preface).
//! Anything else, TLS included, or nothing within the wait, is opaque TCP.

use std::time::Duration;

use tokio::{net::TcpStream, time::Instant};

/// The HTTP/2 connection preface's start.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0";
const METHODS: [&[u8]; 9] = [
    b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"CONNECT", b"OPTIONS", b"TRACE", b"PATCH",
];
/// How often a client that sent too little to tell is looked at again.
const PEEK_AGAIN: Duration = Duration::from_millis(2);

/// What first bytes say.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    Http,
    Other,
    /// Too few bytes to tell.
    Unsure,
}

pub(crate) fn judge(first: &[u8]) -> Verdict {
    let candidates = METHODS
        .iter()
        .map(|m| [*m, b" "].concat())
        .chain(std::iter::once(H2_PREFACE.to_vec()));
    let mut unsure = false;
    for candidate in candidates {
        let n = first.len().min(candidate.len());
        if first[..n] == candidate[..n] {
            if n == candidate.len() {
                return Verdict::Http;
            }
            unsure = true;
        }
    }
    if unsure || first.is_empty() {
        Verdict::Unsure
    } else {
        Verdict::Other
    }
}

/// Whether `client` speaks HTTP, from what it sends within `wait`.
pub async fn speaks_http(client: &TcpStream, wait: Duration) -> bool {
    let deadline = Instant::now() + wait;
    let mut first = [0u8; 16];
    loop {
        let peeked = tokio::time::timeout_at(deadline, client.peek(&mut first)).await;
        let n = match peeked {
            Ok(Ok(n)) => n,
            // No bytes in time, or the socket failed: not HTTP.
            Ok(Err(_)) | Err(_) => return false,
        };
        match judge(&first[..n]) {
            Verdict::Http => return true,
            Verdict::Other => return false,
            // The client closed its side without a whole request line.
            Verdict::Unsure if n == 0 => return false,
            Verdict::Unsure => {
                if Instant::now() + PEEK_AGAIN > deadline {
                    return false;
                }
                tokio::time::sleep(PEEK_AGAIN).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::{io::AsyncWriteExt, net::TcpListener};

    use super::*;

    #[test]
    fn first_bytes_are_judged() {
        let rows: [(&[u8], Verdict); 9] = [
            (b"GET / HTTP/1.1\r\n", Verdict::Http),
            (b"POST ", Verdict::Http),
            (b"PRI * HTTP/2.0\r\n\r\nSM", Verdict::Http),
            (b"GE", Verdict::Unsure),
            (b"PRI * HT", Verdict::Unsure),
            (b"GETX", Verdict::Other),
            (b"\x16\x03\x01\x02\x00", Verdict::Other),
            (b"SSH-2.0-", Verdict::Other),
            (b"", Verdict::Unsure),
        ];
        for (first, verdict) in rows {
            assert_eq!(
                judge(first),
                verdict,
                "{:?}",
                String::from_utf8_lossy(first)
            );
        }
    }

    /// A connected pair on loopback.
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        (client, server)
    }

    #[tokio::test]
    async fn a_request_line_sent_in_pieces_is_http_and_stays_in_the_socket() {
        let (mut client, server) = pair().await;
        client.write_all(b"PO").await.unwrap();
        let writer = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            client.write_all(b"ST /cart HTTP/1.1\r\n").await.unwrap();
            client
        });
        assert!(speaks_http(&server, Duration::from_secs(10)).await);
        let _client = writer.await.unwrap();
        let mut first = [0u8; 5];
        assert_eq!(server.peek(&mut first).await.unwrap(), 5);
        assert_eq!(&first, b"POST ");
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_client_is_opaque_once_the_wait_is_over() {
        let (_client, server) = pair().await;
        let started = Instant::now();
        assert!(!speaks_http(&server, Duration::from_secs(1)).await);
        assert_eq!(started.elapsed(), Duration::from_secs(1));
    }

    #[tokio::test]
    async fn tls_is_opaque_at_once() {
        let (mut client, server) = pair().await;
        client.write_all(b"\x16\x03\x01\x02\x00\x01").await.unwrap();
        assert!(!speaks_http(&server, Duration::from_secs(10)).await);
    }
}
