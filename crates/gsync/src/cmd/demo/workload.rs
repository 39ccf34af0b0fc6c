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

/// The entity type of each device's own tasks.
pub(crate) const ENTITY_TYPE: &str = "task";

/// The entity type of the boards every device writes (its own field only).
pub(crate) const BOARD_TYPE: &str = "board";

/// The id of shared board `n`.
pub(crate) fn board_id(n: usize) -> String {
    format!("board-{n}")
}

/// The field of a board that device `device` owns.
pub(crate) fn board_field(device: usize) -> String {
    format!("d{device}")
}

/// One step of a device's workload.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Step {
    /// A change to one of the device's own tasks.
    Task(Action),
    /// The device sets its own field of a shared board to `value` (1, 2, …
    /// per device and board). Other devices write their fields of the same
    /// board concurrently; the default LocalWins 3-way merge must keep them all.
    Board { board: usize, value: u64 },
}

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

/// `ops` steps of device `device` (task ids `d<device>-t<n>`); about one in
/// ten is a board edit when there are `boards`.
pub(crate) fn generate(seed: u64, device: usize, ops: usize, boards: usize) -> Vec<Step> {
    let mut rng = device_rng(seed, device);
    let mut board_values = vec![0u64; boards];
    // The device's local view: live tasks and their data, in creation order
    // (a Vec, so picks are deterministic).
    let mut live: Vec<(String, Value)> = Vec::new();
    let mut next_id = 0u32;
    let mut out = Vec::with_capacity(ops);
    for _ in 0..ops {
        if boards > 0 && rng.random_bool(0.1) {
            let board = rng.random_range(0..boards);
            board_values[board] += 1;
            out.push(Step::Board {
                board,
                value: board_values[board],
            });
            continue;
        }
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
            out.push(Step::Task(Action::Create { id, data }));
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
            out.push(Step::Task(Action::Update {
                id: id.clone(),
                data: data.clone(),
            }));
        } else {
            let i = rng.random_range(0..live.len());
            let (id, _) = live.swap_remove(i);
            out.push(Step::Task(Action::Delete { id }));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_workload() {
        assert_eq!(generate(7, 1, 200, 3), generate(7, 1, 200, 3));
        assert_ne!(generate(7, 1, 200, 3), generate(8, 1, 200, 3));
        assert_ne!(generate(7, 0, 200, 3), generate(7, 1, 200, 3));
    }

    #[test]
    fn actions_respect_the_lifecycle() {
        // Creates first, never an update or delete of an unknown or deleted id.
        let steps = generate(3, 2, 500, 2);
        let boards = steps
            .iter()
            .filter(|s| matches!(s, Step::Board { .. }))
            .count();
        assert!(boards > 20, "{boards} board edits");
        let actions: Vec<Action> = steps
            .into_iter()
            .filter_map(|s| match s {
                Step::Task(a) => Some(a),
                Step::Board { .. } => None,
            })
            .collect();
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
