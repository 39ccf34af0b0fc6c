//! The seeded workload: what each simulated device does to its own tasks.
//!
//! The workload is generated up front from `(seed, device, ops)` alone, so the
//! same seed always gives the same actions, whatever the timing of the run.
//! Each device owns the entities whose ids start with its prefix; nobody else
//! writes them (except the server's forced-conflict fault, which bumps the
//! version without changing the data), so the final state the server must
//! hold is simply the result of applying the device's actions in order.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

/// The entity type every device writes.
pub(crate) const ENTITY_TYPE: &str = "task";

/// One change a device's user makes.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Action {
    /// A new task.
    Create { id: String, data: Value },
    /// A toggle of `done` or a form edit (title, notes, priority).
    Update { id: String, data: Value },
    /// The task is deleted (its id is never used again).
    Delete { id: String },
}

impl Action {
    /// The entity the action touches.
    pub(crate) fn id(&self) -> &str {
        match self {
            Self::Create { id, .. } | Self::Update { id, .. } | Self::Delete { id } => id,
        }
    }
}

const TITLES: [&str; 8] = [
    "buy milk",
    "call the plumber",
    "renew passport",
    "water the plants",
    "book flights",
    "fix the bike",
    "pay rent",
    "write the report",
];

const NOTES: [&str; 6] = [
    "",
    "before Friday",
    "ask Sam first",
    "see the email thread",
    "urgent",
    "low priority, whenever",
];

fn pick<'a>(rng: &mut StdRng, from: &[&'a str]) -> &'a str {
    from[rng.random_range(0..from.len())]
}

/// The random generator of one device: independent streams per device.
fn device_rng(seed: u64, device: usize) -> StdRng {
    let mix = (device as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    StdRng::seed_from_u64(seed ^ mix)
}

/// `ops` actions of device `device` (ids `d<device>-t<n>`).
pub(crate) fn generate(seed: u64, device: usize, ops: usize) -> Vec<Action> {
    let mut rng = device_rng(seed, device);
    // The device's local view: live tasks and their data, in creation order
    // (a Vec, so picks are deterministic).
    let mut live: Vec<(String, Value)> = Vec::new();
    let mut next_id = 0u32;
    let mut out = Vec::with_capacity(ops);
    for _ in 0..ops {
        let roll: f64 = rng.random();
        if live.len() < 3 || roll < 0.25 {
            let id = format!("d{device}-t{next_id}");
            next_id += 1;
            let data = json!({
                "title": pick(&mut rng, &TITLES),
                "done": false,
                "priority": rng.random_range(1..=3),
                "notes": pick(&mut rng, &NOTES),
                "rev": 0,
            });
            live.push((id.clone(), data.clone()));
            out.push(Action::Create { id, data });
        } else if roll < 0.88 {
            let i = rng.random_range(0..live.len());
            let (id, data) = &mut live[i];
            let Value::Object(fields) = data else {
                continue;
            };
            if rng.random_bool(0.5) {
                let done = fields.get("done").and_then(Value::as_bool).unwrap_or(false);
                fields.insert("done".into(), Value::Bool(!done));
            } else {
                match rng.random_range(0..3) {
                    0 => fields.insert("title".into(), json!(pick(&mut rng, &TITLES))),
                    1 => fields.insert("notes".into(), json!(pick(&mut rng, &NOTES))),
                    _ => fields.insert("priority".into(), json!(rng.random_range(1..=3))),
                };
            }
            let rev = fields.get("rev").and_then(Value::as_u64).unwrap_or(0) + 1;
            fields.insert("rev".into(), json!(rev));
            out.push(Action::Update {
                id: id.clone(),
                data: data.clone(),
            });
        } else {
            let i = rng.random_range(0..live.len());
            let (id, _) = live.swap_remove(i);
            out.push(Action::Delete { id });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_workload() {
        assert_eq!(generate(7, 1, 200), generate(7, 1, 200));
        assert_ne!(generate(7, 1, 200), generate(8, 1, 200));
        assert_ne!(generate(7, 0, 200), generate(7, 1, 200));
    }

    #[test]
    fn actions_respect_the_lifecycle() {
        // Creates first, never an update or delete of an unknown or deleted id.
        let actions = generate(3, 2, 500);
        let mut state = std::collections::HashMap::new();
        for a in &actions {
            assert!(a.id().starts_with("d2-"));
            match a {
                Action::Create { id, .. } => assert!(state.insert(id.clone(), true).is_none()),
                Action::Update { id, .. } => assert_eq!(state.get(id), Some(&true)),
                Action::Delete { id } => {
                    assert_eq!(state.insert(id.clone(), false), Some(true));
                }
            }
        }
        let kinds = |f: fn(&Action) -> bool| actions.iter().filter(|a| f(a)).count();
        assert!(kinds(|a| matches!(a, Action::Create { .. })) > 50);
        assert!(kinds(|a| matches!(a, Action::Update { .. })) > 200);
        assert!(kinds(|a| matches!(a, Action::Delete { .. })) > 20);
    }
}
