//! The slow path, for what the hot path hands over: the full decoder for
//! unusual messages (other opcodes, EDNS versions, compressed questions,
//! other classes) and forwarding with a cache for names outside the zone.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{DNSClass, RData, RecordType};

use crate::answer::{self, Outcome};
use crate::cache::{Cache, Kind};
use crate::forward;
use crate::index::{Index, Published};
use crate::metrics::{Metrics, WorkerCounters};
use crate::wire;
use crate::zone::name_key;

pub struct SlowPath {
    pub published: Arc<Published>,
    pub upstreams: Vec<SocketAddr>,
    pub cache: Mutex<Cache>,
    pub metrics: Arc<Metrics>,
    pub counters: Arc<WorkerCounters>,
}

impl SlowPath {
    /// The answer to `packet` (a query the hot path passed on), or `None`
    /// to stay silent. `udp` limits the size and may set TC.
    pub async fn handle(&self, packet: &[u8], udp: bool) -> Option<Vec<u8>> {
        let request = match Message::from_vec(packet) {
            Ok(m) => m,
            Err(_) => {
                // Undecodable: FORMERR if there is a header to answer.
                return (packet.len() >= wire::HEADER_LEN && packet[2] & wire::FLAG_QR == 0).then(
                    || {
                        self.error(
                            packet_id(packet),
                            OpCode::Query,
                            ResponseCode::FormErr,
                            None,
                        )
                    },
                );
            }
        };
        if request.metadata.message_type != MessageType::Query {
            return None;
        }
        let id = request.metadata.id;
        let op = request.metadata.op_code;
        let edns = request.edns.clone();
        if op != OpCode::Query {
            return Some(self.error(id, op, ResponseCode::NotImp, edns.as_ref()));
        }
        if let Some(e) = &edns
            && e.version() > 0
        {
            return Some(self.error(id, op, ResponseCode::BADVERS, edns.as_ref()));
        }
        let [query] = &request.queries[..] else {
            return Some(self.error(id, op, ResponseCode::FormErr, edns.as_ref()));
        };
        self.counters.request(
            if udp {
                crate::metrics::Proto::Udp
            } else {
                crate::metrics::Proto::Tcp
            },
            u16::from(query.query_type()),
        );
        if query.query_class() != DNSClass::IN {
            return Some(self.reply_error(&request, ResponseCode::Refused));
        }
        // A clean re-encoding lets the hot path answer zone names that came
        // in an unusual shape (compressed question, TSIG, …).
        let mut clean = Message::new(id, MessageType::Query, OpCode::Query);
        clean.metadata.recursion_desired = request.metadata.recursion_desired;
        clean.metadata.checking_disabled = request.metadata.checking_disabled;
        clean.add_query(query.clone());
        if let Some(e) = &edns {
            let mut e2 = Edns::new();
            e2.set_max_payload(e.max_payload());
            e2.set_dnssec_ok(e.flags().dnssec_ok);
            clean.set_edns(e2);
        }
        if let Ok(bytes) = clean.to_vec() {
            let index = self.published.load();
            let mut out = vec![0u8; 65535];
            if let Outcome::Reply { len, rcode, .. } =
                answer::answer_local(&bytes, &mut out, &index, udp)
            {
                out.truncate(len);
                if index.zone.forwarding
                    && !self.upstreams.is_empty()
                    && let Some(done) = self.complete_alias(&out, query, &index).await
                {
                    self.counters.response(done.metadata.response_code.low());
                    return encode_limited(&done, udp_limit(udp, edns.as_ref()));
                }
                self.counters.response(rcode);
                return Some(out);
            }
            if !index.zone.forwarding || self.upstreams.is_empty() {
                return Some(self.reply_error(&request, ResponseCode::Refused));
            }
        }
        let answer = self.forward(query).await;
        let mut response = match answer {
            Some(answer) => answer,
            None => return Some(self.reply_error(&request, ResponseCode::ServFail)),
        };
        response.metadata.id = id;
        response.metadata.recursion_desired = request.metadata.recursion_desired;
        response.metadata.checking_disabled = request.metadata.checking_disabled;
        response.edns = edns.as_ref().map(|_| our_edns());
        response.signature = None;
        self.counters
            .response(response.metadata.response_code.low());
        encode_limited(&response, udp_limit(udp, edns.as_ref()))
    }

    /// An ExternalName answer whose CNAME chain ends outside the zone,
    /// completed with that name's records from upstream, as CoreDNS does
    /// (the rcode stays NOERROR; no answer upstream leaves the chain
    /// alone). `None` when `reply` is no such answer.
    async fn complete_alias(&self, reply: &[u8], query: &Query, index: &Index) -> Option<Message> {
        if !matches!(query.query_type(), RecordType::A | RecordType::AAAA) {
            return None;
        }
        let mut message = Message::from_vec(reply).ok()?;
        if message.metadata.truncation {
            return None;
        }
        let RData::CNAME(target) = &message.answers.last()?.data else {
            return None;
        };
        if wire::is_subdomain(&name_key(&target.0), &index.zone.apex) {
            return None;
        }
        let upstream = self
            .forward(&Query::query(target.0.clone(), query.query_type()))
            .await?;
        message.answers.extend(upstream.answers);
        Some(message)
    }

    async fn forward(&self, query: &Query) -> Option<Message> {
        let now = Instant::now();
        let cached = self.cache.lock().unwrap_or_else(|e| e.into_inner()).get(
            query.name(),
            query.query_type(),
            query.query_class(),
            now,
        );
        if let Some((message, kind)) = cached {
            let kind = match kind {
                Kind::Success => "success",
                Kind::Denial => "denial",
            };
            self.metrics
                .cache_hits
                .get_or_create(&vec![("server", "dns://"), ("type", kind)])
                .inc();
            return Some(message);
        }
        self.metrics.cache_misses.inc();
        let answer = forward::resolve(&self.upstreams, query, &self.metrics).await?;
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache.put(&answer, Instant::now());
        for (kind, label) in [(Kind::Success, "success"), (Kind::Denial, "denial")] {
            self.metrics
                .cache_entries
                .get_or_create(&vec![("server", "dns://"), ("type", label)])
                .set(cache.entries(kind) as i64);
        }
        Some(answer)
    }

    fn reply_error(&self, request: &Message, rcode: ResponseCode) -> Vec<u8> {
        let mut response = Message::response(request.metadata.id, request.metadata.op_code);
        response.metadata.response_code = rcode;
        response.metadata.recursion_desired = request.metadata.recursion_desired;
        response.queries = request.queries.clone();
        if request.edns.is_some() {
            response.set_edns(our_edns());
        }
        self.counters.response(rcode.low());
        response.to_vec().unwrap_or_default()
    }

    fn error(&self, id: u16, op: OpCode, rcode: ResponseCode, edns: Option<&Edns>) -> Vec<u8> {
        let mut response = Message::error_msg(id, op, rcode);
        if edns.is_some() || rcode.high() > 0 {
            response.set_edns(our_edns());
        }
        self.counters
            .response(if rcode.high() > 0 { 16 } else { rcode.low() });
        response.to_vec().unwrap_or_default()
    }
}

/// The largest answer the transport takes: the client's EDNS size (at
/// least 512, at most our cap) over UDP, 64 KiB over TCP.
fn udp_limit(udp: bool, edns: Option<&Edns>) -> usize {
    if !udp {
        return 65535;
    }
    edns.map(|e| usize::from(e.max_payload().clamp(512, wire::MAX_UDP_PAYLOAD)))
        .unwrap_or(512)
}

/// `response` encoded, or its truncated form (TC set) when over `limit`.
fn encode_limited(response: &Message, limit: usize) -> Option<Vec<u8>> {
    let bytes = response.to_vec().ok()?;
    if bytes.len() <= limit {
        return Some(bytes);
    }
    let mut truncated = response.truncate();
    truncated.edns = response.edns.clone();
    truncated.to_vec().ok()
}

fn our_edns() -> Edns {
    let mut edns = Edns::new();
    edns.set_max_payload(wire::MAX_UDP_PAYLOAD);
    edns
}

fn packet_id(packet: &[u8]) -> u16 {
    u16::from_be_bytes([packet[0], packet[1]])
}
