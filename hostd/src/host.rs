//! The host's settings: the budget (default: the host's memory minus a reserve), the tick, and
//! the policy's parameters, as set by the command line and by `PUT /host/memory`.

use serde::{Deserialize, Serialize};

use crate::registry::HostSettings;

/// Shortest and longest tick, ms.
pub const TICK_MS_RANGE: (u64, u64) = (100, 60_000);
/// The default tick: statistics arrive every second.
pub const DEFAULT_TICK_MS: u64 = 1000;

/// The default reserve: what the host keeps for itself and the VMMs' own memory, MiB: 10% of its
/// memory, at least 512 MiB.
pub fn default_reserve_mib(mem_total_mib: u64) -> u64 {
    (mem_total_mib / 10).max(512)
}

/// `PUT /host/memory`: absent fields keep their value; `params` may name any subset of the
/// policy's parameters.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostUpdate {
    /// The new budget, MiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget_mib: Option<u64>,
    /// The new control loop period, ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tick_ms: Option<u64>,
    /// Policy parameters to change, by name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub params: Option<serde_json::Map<String, serde_json::Value>>,
}

/// Why an update cannot apply: a bad value (400), or a budget below what is guaranteed (409).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpdateError {
    /// A value out of range or of the wrong type (400).
    Invalid(String),
    /// A budget below what admission control has promised (409).
    Conflict(String),
}

impl HostUpdate {
    /// The settings after the update; `guaranteed_mib` is what admission control has promised.
    pub fn apply(
        &self,
        old: &HostSettings,
        guaranteed_mib: u64,
    ) -> Result<HostSettings, UpdateError> {
        use UpdateError::*;
        let mut s = *old;
        if let Some(b) = self.budget_mib {
            if b == 0 || b > api::MAX_MEM_MIB * 1024 {
                return Err(Invalid(format!(
                    "budget_mib: {b} MiB is out of range 1..={} MiB",
                    api::MAX_MEM_MIB * 1024
                )));
            }
            if b < guaranteed_mib {
                return Err(Conflict(format!(
                    "budget_mib: {b} MiB is below the {guaranteed_mib} MiB guaranteed to the \
                     VMs (their min_mib added up); lower some VM's min_mib or delete a VM first"
                )));
            }
            s.budget_mib = b;
        }
        if let Some(t) = self.tick_ms {
            let (lo, hi) = TICK_MS_RANGE;
            if !(lo..=hi).contains(&t) {
                return Err(Invalid(format!(
                    "tick_ms: {t} ms is out of range {lo}..={hi} ms"
                )));
            }
            s.tick_ms = t;
        }
        if let Some(p) = &self.params {
            s.params = merge_params(&s.params, p).map_err(Invalid)?;
        }
        Ok(s)
    }
}

/// The current parameters with `changes` laid over them, validated.
fn merge_params(
    current: &policy::Params,
    changes: &serde_json::Map<String, serde_json::Value>,
) -> Result<policy::Params, String> {
    let mut v = serde_json::to_value(current).map_err(|e| e.to_string())?;
    let obj = v
        .as_object_mut()
        .ok_or("the parameters are not an object")?;
    for (k, val) in changes {
        obj.insert(k.clone(), val.clone());
    }
    let params: policy::Params = serde_json::from_value(v).map_err(|e| format!("params: {e}"))?;
    params.validate().map_err(|e| format!("params.{e}"))?;
    Ok(params)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> HostSettings {
        HostSettings {
            budget_mib: 4096,
            tick_ms: 1000,
            params: policy::Params::default(),
        }
    }

    #[test]
    fn a_budget_below_the_guarantees_is_a_conflict() {
        let u = HostUpdate {
            budget_mib: Some(1000),
            ..Default::default()
        };
        match u.apply(&settings(), 1500) {
            Err(UpdateError::Conflict(m)) => {
                assert!(m.contains("below the 1500 MiB guaranteed"), "{m}")
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(u.apply(&settings(), 1000).unwrap().budget_mib, 1000);
    }

    #[test]
    fn params_merge_over_the_current_ones_and_are_checked() {
        let mut changes = serde_json::Map::new();
        changes.insert("buffer_pct".into(), 30.into());
        let u = HostUpdate {
            params: Some(changes),
            ..Default::default()
        };
        let mut old = settings();
        old.params.shrink_step_pct = 7;
        let new = u.apply(&old, 0).unwrap();
        assert_eq!(new.params.buffer_pct, 30);
        assert_eq!(
            new.params.shrink_step_pct, 7,
            "untouched fields keep their value"
        );

        let mut bad = serde_json::Map::new();
        bad.insert("shrink_step_pct".into(), 0.into());
        let e = HostUpdate {
            params: Some(bad),
            ..Default::default()
        }
        .apply(&old, 0);
        assert_eq!(
            e,
            Err(UpdateError::Invalid(
                "params.shrink_step_pct: 0 % is out of range 1..=100 %".into()
            ))
        );
        let mut unknown = serde_json::Map::new();
        unknown.insert("buffer".into(), 1.into());
        let e = HostUpdate {
            params: Some(unknown),
            ..Default::default()
        }
        .apply(&old, 0);
        assert!(matches!(e, Err(UpdateError::Invalid(m)) if m.contains("unknown field `buffer`")));
    }

    #[test]
    fn tick_range() {
        let u = HostUpdate {
            tick_ms: Some(10),
            ..Default::default()
        };
        assert_eq!(
            u.apply(&settings(), 0),
            Err(UpdateError::Invalid(
                "tick_ms: 10 ms is out of range 100..=60000 ms".into()
            ))
        );
    }

    #[test]
    fn reserve() {
        assert_eq!(default_reserve_mib(4096), 512);
        assert_eq!(default_reserve_mib(65536), 6553);
    }
}
