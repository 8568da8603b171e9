//! The introspections in flight on one worker, and the requests waiting for
//! them. This is the bookkeeping only: it decides what follows each event
//! (a request joins, a callout goes out or answers, a request goes away, a
//! tick) and tells the worker, which talks to Envoy and the caches. Every
//! transition is therefore tested here without a host.
//!
//! A flight is in one phase: our callout is out (`Calling`, sent by a
//! request or by the root), another worker holds the shared marker
//! (`Remote`, polled on the tick), or its sender went away while others
//! still wait (`Orphaned`, re-sent by the root on the next tick).

use crate::bearer::Token;
use crate::cache::TokenHash;
use std::collections::HashMap;

#[derive(Default)]
pub struct Flights {
    flights: HashMap<TokenHash, Flight>,
    /// Callout token id → the token it introspects.
    callouts: HashMap<u32, TokenHash>,
    /// Paused request context id → the token it waits for.
    waiting: HashMap<u32, TokenHash>,
}

struct Flight {
    /// Kept while requests wait, to re-send the call if its sender goes.
    token: Token,
    waiters: Vec<u32>,
    phase: Phase,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// `sender`: the request context that sent it (`None`: the root).
    Calling {
        token_id: u32,
        sender: Option<u32>,
        deadline_ms: u64,
    },
    Remote {
        since_ms: u64,
    },
    Orphaned,
}

/// What a tick must do for one flight.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Due {
    /// Look in the shared cache for another worker's answer.
    Poll { hash: TokenHash, since_ms: u64 },
    /// Send the call again from the root: its sender went away.
    Resend { hash: TokenHash, token: Token },
    /// Our callout passed its deadline unanswered: its answer, should it
    /// still come, belongs to nobody now.
    Expired { hash: TokenHash },
}

/// What follows when a request goes away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Left {
    Nothing,
    /// It sent the callout and nobody else waits: Envoy cancels the call,
    /// so our shared marker must go too.
    ReleaseMarker(TokenHash),
    /// It sent the callout and others wait: the root re-sends it soon.
    ResendSoon,
}

impl Flights {
    /// Request `ctx` joins a flight for this token, if there is one.
    pub fn join(&mut self, hash: TokenHash, ctx: u32) -> bool {
        let Some(flight) = self.flights.get_mut(&hash) else {
            return false;
        };
        flight.waiters.push(ctx);
        self.waiting.insert(ctx, hash);
        true
    }

    /// Request `ctx` waits for another worker's introspection.
    pub fn wait_remote(&mut self, hash: TokenHash, token: &Token, ctx: u32, now_ms: u64) {
        let flight = Flight { token: token.clone(), waiters: vec![ctx], phase: Phase::Remote { since_ms: now_ms } };
        self.flights.insert(hash, flight);
        self.waiting.insert(ctx, hash);
    }

    /// Our callout `token_id` is out, sent by request `sender` (which then
    /// waits for it) or by the root.
    pub fn sent(&mut self, hash: TokenHash, token: &Token, sender: Option<u32>, token_id: u32, deadline_ms: u64) {
        self.callouts.insert(token_id, hash);
        let phase = Phase::Calling { token_id, sender, deadline_ms };
        match self.flights.get_mut(&hash) {
            Some(flight) => flight.phase = phase,
            None => {
                let waiters = sender.into_iter().collect();
                self.flights.insert(hash, Flight { token: token.clone(), waiters, phase });
            }
        }
        if let Some(ctx) = sender {
            self.waiting.insert(ctx, hash);
        }
    }

    /// The token an answered callout was about; `None` if the callout is not
    /// (or no longer) ours.
    pub fn answered(&mut self, token_id: u32) -> Option<TokenHash> {
        self.callouts.remove(&token_id)
    }

    /// The token of a flight (to introspect it, or to name a JWT).
    pub fn token(&self, hash: &TokenHash) -> Option<&Token> {
        self.flights.get(hash).map(|f| &f.token)
    }

    /// Ends a flight: the requests that still wait for its verdict.
    pub fn land(&mut self, hash: &TokenHash) -> Vec<u32> {
        let Some(flight) = self.flights.remove(hash) else {
            return Vec::new();
        };
        flight.waiters.into_iter().filter(|ctx| self.waiting.remove(ctx).is_some()).collect()
    }

    /// Request `ctx` went away.
    pub fn left(&mut self, ctx: u32) -> Left {
        let Some(hash) = self.waiting.remove(&ctx) else {
            return Left::Nothing;
        };
        let Some(flight) = self.flights.get_mut(&hash) else {
            return Left::Nothing;
        };
        flight.waiters.retain(|&w| w != ctx);
        let nobody_waits = flight.waiters.is_empty();
        let (sent_by_it, calling) = match flight.phase {
            Phase::Calling { token_id, sender: Some(s), .. } if s == ctx => (Some(token_id), true),
            Phase::Calling { .. } => (None, true),
            _ => (None, false),
        };
        if let Some(token_id) = sent_by_it {
            // Envoy cancels the callout with its request.
            self.callouts.remove(&token_id);
        }
        match (sent_by_it.is_some(), nobody_waits) {
            (true, true) => {
                self.flights.remove(&hash);
                Left::ReleaseMarker(hash)
            }
            (true, false) => {
                flight.phase = Phase::Orphaned;
                Left::ResendSoon
            }
            (false, true) if !calling => {
                self.flights.remove(&hash);
                Left::Nothing
            }
            // A root callout outlives its waiters: its answer fills the cache.
            _ => Left::Nothing,
        }
    }

    /// What the tick at `now_ms` must do.
    pub fn due(&mut self, now_ms: u64) -> Vec<Due> {
        let mut due = Vec::new();
        for (hash, flight) in &self.flights {
            match flight.phase {
                Phase::Remote { since_ms } => due.push(Due::Poll { hash: *hash, since_ms }),
                Phase::Orphaned => due.push(Due::Resend { hash: *hash, token: flight.token.clone() }),
                Phase::Calling { token_id, deadline_ms, .. } if now_ms > deadline_ms => {
                    self.callouts.remove(&token_id);
                    due.push(Due::Expired { hash: *hash });
                }
                Phase::Calling { .. } => {}
            }
        }
        due
    }

    /// Whether something waits on the tick (a remote wait, a re-send).
    pub fn needs_fast_tick(&self) -> bool {
        self.flights.values().any(|f| matches!(f.phase, Phase::Remote { .. } | Phase::Orphaned))
    }

    pub fn is_waiting(&self, ctx: u32) -> bool {
        self.waiting.contains_key(&ctx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bearer;

    fn token(n: u32) -> (TokenHash, Token) {
        let t = bearer::parse(&[format!("Bearer tok-{n}").as_bytes()], 4096).unwrap();
        (crate::cache::hash_token(&t), t)
    }

    #[test]
    fn waiters_join_a_flight_and_land_with_it() {
        let mut f = Flights::default();
        let (h, t) = token(1);
        assert!(!f.join(h, 1), "no flight yet");
        f.sent(h, &t, Some(1), 77, 5_000);
        assert!(f.join(h, 2) && f.join(h, 3));
        assert!(f.is_waiting(2));
        assert_eq!(f.answered(77), Some(h));
        assert_eq!(f.answered(77), None, "answered once");
        assert_eq!(f.land(&h), vec![1, 2, 3]);
        assert!(!f.is_waiting(1) && f.land(&h).is_empty());
    }

    #[test]
    fn a_waiter_that_left_is_not_answered() {
        let mut f = Flights::default();
        let (h, t) = token(1);
        f.sent(h, &t, Some(1), 77, 5_000);
        f.join(h, 2);
        assert_eq!(f.left(2), Left::Nothing);
        assert_eq!(f.land(&h), vec![1]);
    }

    #[test]
    fn a_sender_that_leaves_others_waiting_is_re_sent_by_the_root() {
        let mut f = Flights::default();
        let (h, t) = token(1);
        f.sent(h, &t, Some(1), 77, 5_000);
        f.join(h, 2);
        assert_eq!(f.left(1), Left::ResendSoon);
        assert_eq!(f.answered(77), None, "Envoy cancelled that call");
        assert!(f.needs_fast_tick());
        assert_eq!(f.due(100), vec![Due::Resend { hash: h, token: t.clone() }]);
        f.sent(h, &t, None, 78, 5_100);
        assert!(!f.needs_fast_tick());
        assert_eq!(f.answered(78), Some(h));
        assert_eq!(f.land(&h), vec![2]);
    }

    #[test]
    fn a_sender_that_leaves_alone_releases_the_marker() {
        let mut f = Flights::default();
        let (h, t) = token(1);
        f.sent(h, &t, Some(1), 77, 5_000);
        assert_eq!(f.left(1), Left::ReleaseMarker(h));
        assert!(f.token(&h).is_none() && f.due(10_000).is_empty());
    }

    #[test]
    fn a_root_callout_outlives_its_last_waiter() {
        let mut f = Flights::default();
        let (h, t) = token(1);
        f.sent(h, &t, None, 77, 5_000);
        f.join(h, 2);
        assert_eq!(f.left(2), Left::Nothing);
        assert_eq!(f.answered(77), Some(h), "its answer still fills the cache");
        assert!(f.land(&h).is_empty());
    }

    #[test]
    fn a_remote_wait_is_polled_and_dropped_when_nobody_waits() {
        let mut f = Flights::default();
        let (h, t) = token(1);
        f.wait_remote(h, &t, 7, 1_000);
        assert!(f.needs_fast_tick());
        assert_eq!(f.due(1_010), vec![Due::Poll { hash: h, since_ms: 1_000 }]);
        assert_eq!(f.token(&h), Some(&t), "kept to take over the call");
        assert_eq!(f.left(7), Left::Nothing);
        assert!(f.due(1_020).is_empty() && !f.needs_fast_tick());
    }

    #[test]
    fn a_remote_wait_taken_over_becomes_our_call() {
        let mut f = Flights::default();
        let (h, t) = token(1);
        f.wait_remote(h, &t, 7, 1_000);
        f.sent(h, &t, None, 90, 4_000);
        assert!(!f.needs_fast_tick());
        assert_eq!(f.answered(90), Some(h));
        assert_eq!(f.land(&h), vec![7]);
    }

    #[test]
    fn a_callout_past_its_deadline_expires_once_and_its_answer_is_nobodys() {
        let mut f = Flights::default();
        let (h, t) = token(1);
        f.sent(h, &t, Some(1), 77, 5_000);
        assert!(f.due(5_000).is_empty(), "not before the deadline");
        assert_eq!(f.due(5_001), vec![Due::Expired { hash: h }]);
        assert_eq!(f.land(&h), vec![1]);
        assert_eq!(f.answered(77), None);
        assert!(f.due(6_000).is_empty());
    }

    #[test]
    fn flights_of_different_tokens_are_apart() {
        let mut f = Flights::default();
        let (h1, t1) = token(1);
        let (h2, t2) = token(2);
        f.sent(h1, &t1, Some(1), 77, 5_000);
        f.sent(h2, &t2, Some(2), 78, 5_000);
        assert_eq!(f.answered(78), Some(h2));
        assert_eq!(f.land(&h2), vec![2]);
        assert!(f.is_waiting(1));
        assert_eq!(f.left(9), Left::Nothing, "an unknown request");
    }
}
