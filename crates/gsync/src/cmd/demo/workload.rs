//! The seeded workload: what each simulated device does to its own tasks.
//!
//! The workload is generated up front from `(seed, device, ops)` alone, so the
//! same seed always gives the same actions, whatever the timing of the run.
//! Each device owns the entities whose ids start with its prefix; nobody else
//! writes them (except the server's forced-conflict fault, which bumps the
//! version without changing the data), so the final state the server must
//! hold is simply the result of applying the device's actions in order.
//!
//! Scenes are the atomic part: a device also owns a few smart-home lights
//! and scenes, and activating a scene switches several of its lights and
//! records the activation as one transaction (all of it or nothing).

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

/// The entity type of each device's own tasks.
pub(crate) const ENTITY_TYPE: &str = "task";

/// The entity type of the boards every device writes (its own field only).
pub(crate) const BOARD_TYPE: &str = "board";

/// The entity type of each device's lights (written only in scenes).
pub(crate) const LIGHT_TYPE: &str = "light";

/// The entity type of each device's scene records (written only in scenes).
pub(crate) const SCENE_TYPE: &str = "scene";

/// Lights per device.
const LIGHTS: usize = 5;

/// Scenes per device.
const SCENE_NAMES: [&str; 3] = ["evening", "movie", "away"];

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
    /// The device activates a scene: 2 to 4 of its lights switch and the
    /// scene's record changes, as one atomic transaction. Every op is on
    /// a different entity; a light or scene is created by the first scene
    /// that touches it and updated afterwards.
    Scene(Vec<Change>),
}

/// One op of a scene: an action on an entity of type `entity_type`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Change {
    pub(crate) entity_type: &'static str,
    pub(crate) action: Action,
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

/// The device's lights and scenes as its scenes have left them.
#[derive(Debug)]
struct Home {
    lights: Vec<Option<Value>>,
    /// Activations of each scene so far.
    activations: Vec<u64>,
}

impl Home {
    fn new() -> Self {
        Self {
            lights: vec![None; LIGHTS],
            activations: vec![0; SCENE_NAMES.len()],
        }
    }

    /// The changes of one activation of a random scene on `device`.
    fn scene(&mut self, rng: &mut StdRng, device: usize) -> Vec<Change> {
        let scene = rng.random_range(0..SCENE_NAMES.len());
        let count = rng.random_range(2..=4);
        let mut picked: Vec<usize> = (0..LIGHTS).collect();
        // A partial Fisher-Yates shuffle: `count` distinct lights.
        for i in 0..count {
            let j = rng.random_range(i..LIGHTS);
            picked.swap(i, j);
        }
        picked.truncate(count);
        let mut changes = Vec::with_capacity(count + 1);
        let mut ids = Vec::with_capacity(count);
        for &l in &picked {
            let id = format!("d{device}-light-{l}");
            let data = json!({
                "on": rng.random_bool(0.7),
                "brightness": rng.random_range(1..=100),
                "scene": SCENE_NAMES[scene],
            });
            let action = match self.lights[l].replace(data.clone()) {
                None => Action::Create {
                    id: id.clone(),
                    data,
                },
                Some(_) => Action::Update {
                    id: id.clone(),
                    data,
                },
            };
            changes.push(Change {
                entity_type: LIGHT_TYPE,
                action,
            });
            ids.push(id);
        }
        self.activations[scene] += 1;
        let id = format!("d{device}-scene-{scene}");
        let data = json!({
            "name": SCENE_NAMES[scene],
            "lights": ids,
            "activations": self.activations[scene],
        });
        let action = if self.activations[scene] == 1 {
            Action::Create { id, data }
        } else {
            Action::Update { id, data }
        };
        changes.push(Change {
            entity_type: SCENE_TYPE,
            action,
        });
        changes
    }
}

/// `ops` steps of device `device` (task ids `d<device>-t<n>`); about one in
/// ten is a board edit when there are `boards`, and about one in twelve of
/// the others a scene.
pub(crate) fn generate(seed: u64, device: usize, ops: usize, boards: usize) -> Vec<Step> {
    let mut rng = device_rng(seed, device);
    let mut board_values = vec![0u64; boards];
    let mut home = Home::new();
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
        if rng.random_bool(0.08) {
            out.push(Step::Scene(home.scene(&mut rng, device)));
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
                Step::Board { .. } | Step::Scene(_) => None,
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

    #[test]
    fn scenes_switch_distinct_lights_created_once() {
        let steps = generate(5, 1, 500, 3);
        let scenes: Vec<&Vec<Change>> = steps
            .iter()
            .filter_map(|s| match s {
                Step::Scene(c) => Some(c),
                _ => None,
            })
            .collect();
        assert!(scenes.len() > 20, "{} scenes", scenes.len());
        let mut created = std::collections::HashSet::new();
        for changes in scenes {
            assert!((3..=5).contains(&changes.len()), "{changes:?}");
            let ids: std::collections::HashSet<&str> =
                changes.iter().map(|c| c.action.id()).collect();
            assert_eq!(ids.len(), changes.len(), "one op per entity: {changes:?}");
            assert_eq!(changes.last().unwrap().entity_type, SCENE_TYPE);
            for c in changes {
                assert!(c.action.id().starts_with("d1-"));
                match &c.action {
                    Action::Create { id, .. } => assert!(created.insert(id.clone())),
                    Action::Update { id, .. } => assert!(created.contains(id)),
                    Action::Delete { .. } => panic!("scenes never delete"),
                }
            }
        }
    }
}
