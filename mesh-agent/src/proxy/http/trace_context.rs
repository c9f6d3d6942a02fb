//! Trace context in request headers: the caller's W3C `traceparent` (and `tracestate`) or,
//! failing that, its B3 headers (single `b3` or `x-b3-*`) are read; the request goes on
//! carrying the agent's own span as its parent, in `traceparent` and in whichever B3 form came
//! in. Sampling follows the parent's decision; a request without one is sampled at the
//! configured ratio, and the decision travels on either way.

use std::sync::Arc;

use http::{HeaderMap, HeaderName, HeaderValue};
use opentelemetry::trace::{SpanId, TraceId};

use crate::observability::traces::Tracer;

static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
static B3: HeaderName = HeaderName::from_static("b3");
static B3_TRACE_ID: HeaderName = HeaderName::from_static("x-b3-traceid");
static B3_SPAN_ID: HeaderName = HeaderName::from_static("x-b3-spanid");
static B3_PARENT_SPAN_ID: HeaderName = HeaderName::from_static("x-b3-parentspanid");
static B3_SAMPLED: HeaderName = HeaderName::from_static("x-b3-sampled");
static B3_FLAGS: HeaderName = HeaderName::from_static("x-b3-flags");

/// The span the caller's headers name as the parent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parent {
    pub trace_id: TraceId,
    pub span_id: SpanId,
    /// The caller's sampling decision, if it made one (B3 may leave it to us).
    pub sampled: Option<bool>,
}

/// Which header form the caller used, so the request goes on in the same one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Form {
    W3c,
    B3Single,
    B3Multi,
}

/// The agent's span of one request: its ids, its parent's, and whether it is sampled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpanContext {
    pub trace_id: TraceId,
    pub span_id: SpanId,
    /// `SpanId::INVALID` for a root span.
    pub parent_span_id: SpanId,
    pub sampled: bool,
    form: Form,
}

impl SpanContext {
    /// The span of a request with `headers`: a child of the caller's span if the headers
    /// name one, else the root of a new trace sampled with probability `ratio`.
    pub fn of_request(headers: &HeaderMap, ratio: f64) -> Self {
        let (parent, form) = match w3c(headers) {
            Some(parent) => (Some(parent), Form::W3c),
            None => match (b3_single(headers), b3_multi(headers)) {
                (Some(parent), _) => (Some(parent), Form::B3Single),
                (None, Some(parent)) => (Some(parent), Form::B3Multi),
                (None, None) => (None, Form::W3c),
            },
        };
        let span_id = SpanId::from_bytes(nonzero(|| fastrand::u64(..)).to_be_bytes());
        match parent {
            Some(parent) => Self {
                trace_id: parent.trace_id,
                span_id,
                parent_span_id: parent.span_id,
                sampled: parent.sampled.unwrap_or_else(|| sample(ratio)),
                form,
            },
            None => Self {
                trace_id: TraceId::from_bytes(nonzero(|| fastrand::u128(..)).to_be_bytes()),
                span_id,
                parent_span_id: SpanId::INVALID,
                sampled: sample(ratio),
                form,
            },
        }
    }

    /// With `tracer` (tracing on), the span of a request with `headers`, made their parent
    /// as the request goes on.
    pub fn carry_on<'t>(
        tracer: Option<&'t Arc<Tracer>>,
        headers: &mut HeaderMap,
    ) -> Option<(&'t Arc<Tracer>, Self)> {
        let tracer = tracer?;
        let span = Self::of_request(headers, tracer.sampling());
        span.inject(headers);
        Some((tracer, span))
    }

    /// Makes this span the parent in `headers` (a request going on): `traceparent` always
    /// (`tracestate` passes as it came), the B3 headers too if the caller used them.
    pub fn inject(&self, headers: &mut HeaderMap) {
        headers.insert(TRACEPARENT.clone(), self.traceparent());
        let (trace, span) = (self.trace_id, self.span_id);
        let sampled = if self.sampled { "1" } else { "0" };
        match self.form {
            Form::W3c => {}
            Form::B3Single => put(headers, &B3, format!("{trace}-{span}-{sampled}")),
            Form::B3Multi => {
                put(headers, &B3_TRACE_ID, trace.to_string());
                put(headers, &B3_SPAN_ID, span.to_string());
                put(headers, &B3_PARENT_SPAN_ID, self.parent_span_id.to_string());
                put(headers, &B3_SAMPLED, sampled.to_owned());
                headers.remove(&B3_FLAGS);
            }
        }
    }
}

impl SpanContext {
    /// `00-<trace id>-<span id>-<flags>`, written without the formatter (every request
    /// carries one).
    fn traceparent(&self) -> HeaderValue {
        let mut text = *b"00-00000000000000000000000000000000-0000000000000000-00";
        hex_into(&mut text[3..35], &self.trace_id.to_bytes());
        hex_into(&mut text[36..52], &self.span_id.to_bytes());
        if self.sampled {
            text[54] = b'1';
        }
        // Hex digits and dashes.
        HeaderValue::from_bytes(&text).unwrap_or(HeaderValue::from_static(""))
    }
}

/// Writes `bytes` as lower-case hex into `out` (twice as long).
fn hex_into(out: &mut [u8], bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for (pair, byte) in out.chunks_exact_mut(2).zip(bytes) {
        pair[0] = DIGITS[usize::from(byte >> 4)];
        pair[1] = DIGITS[usize::from(byte & 0xf)];
    }
}

fn put(headers: &mut HeaderMap, name: &HeaderName, value: String) {
    // Hex digits and dashes are always a valid header value.
    if let Ok(value) = HeaderValue::try_from(value) {
        headers.insert(name.clone(), value);
    }
}

fn sample(ratio: f64) -> bool {
    ratio >= 1.0 || fastrand::f64() < ratio
}

/// A random id that is not all zeros (the invalid id).
fn nonzero<T: PartialEq + Default>(random: impl Fn() -> T) -> T {
    loop {
        let id = random();
        if id != T::default() {
            return id;
        }
    }
}

fn text<'h>(headers: &'h HeaderMap, name: &HeaderName) -> Option<&'h str> {
    headers.get(name)?.to_str().ok()
}

/// `traceparent`: `00-<32 hex>-<16 hex>-<2 hex>`; a later version may append fields.
fn w3c(headers: &HeaderMap) -> Option<Parent> {
    let value = text(headers, &TRACEPARENT)?.trim();
    let mut fields = value.split('-');
    let version = fields.next()?;
    let (trace, span, flags) = (fields.next()?, fields.next()?, fields.next()?);
    let version_ok = version.len() == 2 && version != "ff" && is_hex(version);
    if !version_ok || (version == "00" && fields.next().is_some()) || flags.len() != 2 {
        return None;
    }
    let flags = u8::from_str_radix(flags, 16).ok()?;
    Some(Parent {
        trace_id: trace_id(trace, 32)?,
        span_id: span_id(span)?,
        sampled: Some(flags & 1 == 1),
    })
}

/// `b3: <trace>-<span>[-<sampled>[-<parent>]]`; a lone `0`, `1` or `d` is only a decision.
fn b3_single(headers: &HeaderMap) -> Option<Parent> {
    let mut fields = text(headers, &B3)?.trim().split('-');
    let (trace, span) = (fields.next()?, fields.next()?);
    Some(Parent {
        trace_id: b3_trace_id(trace)?,
        span_id: span_id(span)?,
        sampled: fields.next().and_then(b3_decision),
    })
}

fn b3_multi(headers: &HeaderMap) -> Option<Parent> {
    let debug = text(headers, &B3_FLAGS) == Some("1");
    Some(Parent {
        trace_id: b3_trace_id(text(headers, &B3_TRACE_ID)?)?,
        span_id: span_id(text(headers, &B3_SPAN_ID)?)?,
        sampled: if debug {
            Some(true)
        } else {
            text(headers, &B3_SAMPLED).and_then(b3_decision)
        },
    })
}

fn b3_decision(value: &str) -> Option<bool> {
    match value {
        "1" | "d" | "true" => Some(true),
        "0" | "false" => Some(false),
        _ => None,
    }
}

/// B3 trace ids are 128 or 64 bits (the latter padded on the left).
fn b3_trace_id(hex: &str) -> Option<TraceId> {
    trace_id(hex, 32).or_else(|| trace_id(hex, 16))
}

fn trace_id(hex: &str, digits: usize) -> Option<TraceId> {
    let id = (hex.len() == digits && is_hex(hex))
        .then(|| u128::from_str_radix(hex, 16).ok())
        .flatten()?;
    (id != 0).then(|| TraceId::from_bytes(id.to_be_bytes()))
}

fn span_id(hex: &str) -> Option<SpanId> {
    let id = (hex.len() == 16 && is_hex(hex))
        .then(|| u64::from_str_radix(hex, 16).ok())
        .flatten()?;
    (id != 0).then(|| SpanId::from_bytes(id.to_be_bytes()))
}

/// Lower-case hex only, as both formats require.
fn is_hex(text: &str) -> bool {
    text.bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    const SPAN: &str = "00f067aa0ba902b7";

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(k, v)| {
                (
                    HeaderName::from_static(k),
                    HeaderValue::from_str(v).unwrap(),
                )
            })
            .collect()
    }

    fn value<'h>(headers: &'h HeaderMap, name: &str) -> &'h str {
        headers.get(name).unwrap().to_str().unwrap()
    }

    #[test]
    fn a_traceparent_makes_the_span_its_child_and_its_flag_decides() {
        for (flags, sampled) in [("01", true), ("00", false)] {
            let incoming = headers(&[
                ("traceparent", &format!("00-{TRACE}-{SPAN}-{flags}")),
                ("tracestate", "shop=1"),
            ]);
            let span = SpanContext::of_request(&incoming, 1.0 - f64::from(u8::from(sampled)));
            assert_eq!(span.trace_id.to_string(), TRACE);
            assert_eq!(span.parent_span_id.to_string(), SPAN);
            assert_ne!(span.span_id.to_string(), SPAN);
            assert_eq!(
                span.sampled, sampled,
                "the parent's flag, whatever the ratio"
            );
            let mut outgoing = incoming.clone();
            span.inject(&mut outgoing);
            assert_eq!(
                value(&outgoing, "traceparent"),
                format!("00-{TRACE}-{}-{flags}", span.span_id)
            );
            assert_eq!(value(&outgoing, "tracestate"), "shop=1");
        }
    }

    #[test]
    fn without_a_parent_a_new_trace_is_sampled_at_the_ratio() {
        let none = HeaderMap::new();
        let roots: Vec<_> = (0..1000)
            .map(|_| SpanContext::of_request(&none, 0.25))
            .collect();
        assert!(roots.iter().all(|s| s.parent_span_id == SpanId::INVALID));
        let sampled = roots.iter().filter(|s| s.sampled).count();
        assert!((150..350).contains(&sampled), "{sampled} of 1000 at 0.25");
        assert!(SpanContext::of_request(&none, 1.0).sampled);
        assert!(!SpanContext::of_request(&none, 0.0).sampled);
        let mut outgoing = HeaderMap::new();
        roots[0].inject(&mut outgoing);
        assert!(value(&outgoing, "traceparent").starts_with(&format!("00-{}-", roots[0].trace_id)));
        assert!(outgoing.get("b3").is_none());
    }

    #[test]
    fn b3_headers_are_read_and_written_back_in_their_form() {
        let single = headers(&[("b3", &format!("{TRACE}-{SPAN}-1"))]);
        let span = SpanContext::of_request(&single, 0.0);
        assert_eq!(
            (span.trace_id.to_string().as_str(), span.sampled),
            (TRACE, true)
        );
        let mut outgoing = single.clone();
        span.inject(&mut outgoing);
        assert_eq!(
            value(&outgoing, "b3"),
            format!("{TRACE}-{}-1", span.span_id)
        );
        assert!(outgoing.contains_key("traceparent"));

        let multi = headers(&[("x-b3-traceid", "a3ce929d0e0e4736"), ("x-b3-spanid", SPAN)]);
        let span = SpanContext::of_request(&multi, 1.0);
        assert_eq!(
            span.trace_id.to_string(),
            "0000000000000000a3ce929d0e0e4736"
        );
        assert!(span.sampled, "no decision in the headers: the ratio's");
        let mut outgoing = multi.clone();
        span.inject(&mut outgoing);
        assert_eq!(value(&outgoing, "x-b3-spanid"), span.span_id.to_string());
        assert_eq!(value(&outgoing, "x-b3-parentspanid"), SPAN);
        assert_eq!(value(&outgoing, "x-b3-sampled"), "1");
    }

    #[test]
    fn malformed_context_starts_a_new_trace() {
        for bad in [
            format!("00-{TRACE}-{SPAN}"),
            format!("00-{}-{SPAN}-01", "0".repeat(32)),
            format!("00-{TRACE}-{}-01", "0".repeat(16)),
            format!("ff-{TRACE}-{SPAN}-01"),
            format!("00-{}-{SPAN}-01", TRACE.to_uppercase()),
            format!("00-{TRACE}-{SPAN}-01-extra"),
            "garbage".to_owned(),
        ] {
            let span = SpanContext::of_request(&headers(&[("traceparent", &bad)]), 1.0);
            assert_eq!(span.parent_span_id, SpanId::INVALID, "{bad}");
            assert_ne!(span.trace_id.to_string(), TRACE, "{bad}");
        }
        let later = headers(&[("traceparent", &format!("01-{TRACE}-{SPAN}-01-more"))]);
        assert_eq!(
            SpanContext::of_request(&later, 0.0).trace_id.to_string(),
            TRACE,
            "a later version may add fields"
        );
    }
}
