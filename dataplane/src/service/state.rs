//! Per-flow protocol state and its timeouts, as the kernel's conntrack
//! keeps them (`nf_conntrack_proto_tcp.c`, `nf_conntrack_proto_udp.c`),
//! simplified to what a NAT needs: when a flow is over and how long it may
//! sit idle.

use std::fmt;

use super::wire::TcpFlags;

/// Which way a packet travels relative to the flow's first packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Client towards the Service.
    Original,
    /// Endpoint back towards the client.
    Reply,
}

/// TCP connection states (the kernel's names).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TcpState {
    SynSent,
    SynRecv,
    Established,
    /// The side given sent the first FIN.
    FinWait(Direction),
    /// The other side acknowledged that FIN and may still send.
    CloseWait(Direction),
    /// Both sides sent FIN; waiting for the last ACK from the first closer.
    LastAck(Direction),
    TimeWait,
    Close,
}

impl TcpState {
    /// The state after a packet in `direction` with `flags`.
    pub fn next(self, direction: Direction, flags: TcpFlags) -> TcpState {
        use Direction::*;
        use TcpState::*;
        if flags.rst() {
            return Close;
        }
        match self {
            SynSent if direction == Reply && flags.syn() && flags.ack() => SynRecv,
            SynRecv if direction == Original && flags.fin() => FinWait(Original),
            SynRecv if direction == Original && flags.ack() && !flags.syn() => Established,
            Established if flags.fin() => FinWait(direction),
            FinWait(first) if direction != first && flags.fin() => LastAck(first),
            FinWait(first) if direction != first && flags.ack() => CloseWait(first),
            CloseWait(first) if direction != first && flags.fin() => LastAck(first),
            LastAck(first) if direction == first && flags.ack() => TimeWait,
            state => state,
        }
    }

    /// A SYN from the client in these states starts a new connection over
    /// the same addresses (the kernel lets a SYN reopen TIME_WAIT/CLOSE).
    pub fn reopens(self, direction: Direction, flags: TcpFlags) -> bool {
        matches!(self, TcpState::TimeWait | TcpState::Close)
            && direction == Direction::Original
            && flags.syn()
            && !flags.ack()
    }
}

impl fmt::Display for TcpState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TcpState::SynSent => "SYN_SENT",
            TcpState::SynRecv => "SYN_RECV",
            TcpState::Established => "ESTABLISHED",
            TcpState::FinWait(_) => "FIN_WAIT",
            TcpState::CloseWait(_) => "CLOSE_WAIT",
            TcpState::LastAck(_) => "LAST_ACK",
            TcpState::TimeWait => "TIME_WAIT",
            TcpState::Close => "CLOSE",
        })
    }
}

/// A tracked flow's protocol state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlowState {
    Tcp(TcpState),
    /// Whether the endpoint has answered.
    Udp {
        replied: bool,
    },
}

impl fmt::Display for FlowState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FlowState::Tcp(s) => s.fmt(f),
            FlowState::Udp { replied: false } => f.write_str("UNREPLIED"),
            FlowState::Udp { replied: true } => f.write_str("ASSURED"),
        }
    }
}

/// Idle timeouts in milliseconds. `Default` is the kernel's defaults
/// (`nf_conntrack_tcp_timeout_*`, `nf_conntrack_udp_timeout{,_stream}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    pub tcp_syn_sent: u64,
    pub tcp_syn_recv: u64,
    pub tcp_established: u64,
    pub tcp_fin_wait: u64,
    pub tcp_close_wait: u64,
    pub tcp_last_ack: u64,
    pub tcp_time_wait: u64,
    pub tcp_close: u64,
    pub udp: u64,
    pub udp_stream: u64,
}

const SECOND: u64 = 1000;

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            tcp_syn_sent: 120 * SECOND,
            tcp_syn_recv: 60 * SECOND,
            tcp_established: 5 * 24 * 3600 * SECOND,
            tcp_fin_wait: 120 * SECOND,
            tcp_close_wait: 60 * SECOND,
            tcp_last_ack: 30 * SECOND,
            tcp_time_wait: 120 * SECOND,
            tcp_close: 10 * SECOND,
            udp: 30 * SECOND,
            udp_stream: 120 * SECOND,
        }
    }
}

impl Timeouts {
    pub fn for_state(&self, state: FlowState) -> u64 {
        match state {
            FlowState::Tcp(tcp) => match tcp {
                TcpState::SynSent => self.tcp_syn_sent,
                TcpState::SynRecv => self.tcp_syn_recv,
                TcpState::Established => self.tcp_established,
                TcpState::FinWait(_) => self.tcp_fin_wait,
                TcpState::CloseWait(_) => self.tcp_close_wait,
                TcpState::LastAck(_) => self.tcp_last_ack,
                TcpState::TimeWait => self.tcp_time_wait,
                TcpState::Close => self.tcp_close,
            },
            FlowState::Udp { replied: false } => self.udp,
            FlowState::Udp { replied: true } => self.udp_stream,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Direction::*;
    use super::*;

    const SYN: TcpFlags = TcpFlags(TcpFlags::SYN);
    const SYN_ACK: TcpFlags = TcpFlags(TcpFlags::SYN | TcpFlags::ACK);
    const ACK: TcpFlags = TcpFlags(TcpFlags::ACK);
    const FIN_ACK: TcpFlags = TcpFlags(TcpFlags::FIN | TcpFlags::ACK);
    const RST: TcpFlags = TcpFlags(TcpFlags::RST);

    fn run(steps: &[(Direction, TcpFlags)]) -> Vec<TcpState> {
        let mut state = TcpState::SynSent;
        steps
            .iter()
            .map(|&(d, f)| {
                state = state.next(d, f);
                state
            })
            .collect()
    }

    #[test]
    fn handshake_and_orderly_close() {
        let states = run(&[
            (Reply, SYN_ACK),
            (Original, ACK),
            (Original, ACK),
            (Original, FIN_ACK),
            (Reply, ACK),
            (Reply, FIN_ACK),
            (Original, ACK),
        ]);
        assert_eq!(
            states,
            [
                TcpState::SynRecv,
                TcpState::Established,
                TcpState::Established,
                TcpState::FinWait(Original),
                TcpState::CloseWait(Original),
                TcpState::LastAck(Original),
                TcpState::TimeWait,
            ]
        );
    }

    #[test]
    fn simultaneous_fin_and_reset() {
        let states = run(&[
            (Reply, SYN_ACK),
            (Original, ACK),
            (Reply, FIN_ACK),
            (Original, FIN_ACK),
            (Reply, ACK),
        ]);
        assert_eq!(
            states[2..],
            [
                TcpState::FinWait(Reply),
                TcpState::LastAck(Reply),
                TcpState::TimeWait
            ]
        );
        assert_eq!(TcpState::Established.next(Reply, RST), TcpState::Close);
        assert!(TcpState::TimeWait.reopens(Original, SYN));
        assert!(!TcpState::Established.reopens(Original, SYN));
    }

    #[test]
    fn kernel_default_timeouts() {
        let t = Timeouts::default();
        assert_eq!(
            t.for_state(FlowState::Tcp(TcpState::Established)),
            432_000_000
        );
        assert_eq!(t.for_state(FlowState::Tcp(TcpState::SynSent)), 120_000);
        assert_eq!(t.for_state(FlowState::Tcp(TcpState::TimeWait)), 120_000);
        assert_eq!(t.for_state(FlowState::Tcp(TcpState::Close)), 10_000);
        assert_eq!(t.for_state(FlowState::Udp { replied: false }), 30_000);
        assert_eq!(t.for_state(FlowState::Udp { replied: true }), 120_000);
    }
}
