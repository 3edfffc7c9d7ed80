//! The VM's configuration phase on the API, before `PUT /actions InstanceStart`: `main` waits
//! on the request channel ([`configure_until_start`]), fills a [`PartialConfig`] from
//! `PUT /boot-source`, `/machine-config`, `/balloon`, `/hotplug/memory` and their PATCHes,
//! answers GETs from it (sizes, no guest yet), and boots on `InstanceStart`, answered only
//! once the VM really started, or with the reason it could not, in the API's words.
//!
//! Values are checked when they arrive ([`api::rules`]); the rules that tie fields together (a
//! balloon smaller than the memory) once more at `InstanceStart`, when every field is final
//! ([`VmConfig::from_partial`]).

use std::sync::mpsc::Receiver;

use api::rules;
use api::{
    ActionType, ApiError, ApiMessage, ApiRequest, ApiResponse, ApiResult, BalloonState,
    BalloonStats, HotplugMemoryState, InstanceState, MetricsSnapshot, ResizeStatus,
};

use crate::api_bridge::{instance_info, request_name};
use crate::config::{BalloonOptions, HotplugOptions, PartialConfig, VmConfig, DEFAULT_MEMORY_MIB};

/// What `main` should do after the configuration phase.
pub enum StartDecision {
    /// Boot this configuration; `reply` (if any) is answered once the VM started.
    Start {
        /// The validated configuration.
        config: VmConfig,
        /// Where to answer `InstanceStart`, when the API asked for it.
        reply: Option<api::bridge::Responder>,
    },
    /// The API server went away before a start was asked.
    ChannelClosed,
}

fn balloon_options(b: &api::BalloonConfig) -> BalloonOptions {
    BalloonOptions {
        amount_mib: b.amount_mib,
        deflate_on_oom: b.deflate_on_oom,
        stats_interval_s: b.stats_polling_interval_s as u64,
        free_page_reporting: b.free_page_reporting,
    }
}

/// Answer pre-boot requests until `InstanceStart` with a valid configuration.
pub fn configure_until_start(
    rx: &Receiver<ApiMessage>,
    partial: &mut PartialConfig,
) -> StartDecision {
    loop {
        let Ok(msg) = rx.recv() else {
            return StartDecision::ChannelClosed;
        };
        let (request, responder) = msg.into_parts();
        let result = match request {
            ApiRequest::Action(ActionType::InstanceStart) => match start_config(partial) {
                Ok(config) => {
                    return StartDecision::Start {
                        config,
                        reply: Some(responder),
                    }
                }
                Err(e) => Err(e),
            },
            other => configure(other, partial),
        };
        responder.respond(result);
    }
}

/// The configuration `InstanceStart` boots, or why it cannot, in the API's words: the rules of
/// the command line ([`VmConfig::from_partial`]) with the fields named as the API names them.
pub fn start_config(partial: &PartialConfig) -> Result<VmConfig, ApiError> {
    if partial.kernel.is_none() {
        return Err(ApiError::bad_request(
            "kernel_image_path: no boot source: PUT /boot-source {\"kernel_image_path\": ...} first",
        ));
    }
    VmConfig::from_partial(partial.clone()).map_err(|e| ApiError::bad_request(e.for_api()))
}

/// The answer to an `InstanceStart` whose configuration was valid but whose VM could not be
/// built or started (KVM refused, a file could not be read, ...).
pub fn start_failed(e: &dyn std::fmt::Display) -> ApiError {
    ApiError::bad_request(format!("cannot start: {e}"))
}

fn needs_running_vm(request: &ApiRequest) -> ApiError {
    ApiError::conflict(format!(
        "{} needs a running VM; configure it and PUT /actions {{\"action_type\": \"InstanceStart\"}} first",
        request_name(request)
    ))
}

fn not_configured_balloon() -> ApiError {
    ApiError::not_found("no balloon is configured: PUT /balloon first")
}

fn not_configured_hotplug() -> ApiError {
    ApiError::not_found("no hot-add memory is configured: PUT /hotplug/memory first")
}

/// One request before start (all but `InstanceStart`): changes `partial` or reads it. Public so
/// that tests of the API server can answer as the real VMM does before start.
pub fn configure(request: ApiRequest, partial: &mut PartialConfig) -> ApiResult {
    match request {
        ApiRequest::PutBootSource(b) => {
            partial.kernel = Some(b.kernel_image_path.into());
            partial.initramfs = b.initrd_path.map(Into::into);
            partial.cmdline = b.boot_args;
            Ok(ApiResponse::Empty)
        }
        ApiRequest::PutMachineConfig(m) => {
            partial.vcpus = Some(m.vcpu_count);
            partial.memory_mib = Some(m.mem_size_mib);
            if m.huge_pages.is_some() {
                partial.thp = Some(m.thp());
            }
            Ok(ApiResponse::Empty)
        }
        ApiRequest::PutBalloon(b) => {
            partial.balloon = Some(balloon_options(&b));
            Ok(ApiResponse::Empty)
        }
        ApiRequest::PatchBalloon(u) => {
            let b = partial
                .balloon
                .as_mut()
                .ok_or_else(not_configured_balloon)?;
            b.amount_mib = u.amount_mib;
            Ok(ApiResponse::Empty)
        }
        ApiRequest::PatchBalloonStats(u) => {
            let b = partial
                .balloon
                .as_mut()
                .ok_or_else(not_configured_balloon)?;
            b.stats_interval_s = u.stats_polling_interval_s.into();
            Ok(ApiResponse::Empty)
        }
        ApiRequest::PutHotplugMemory(h) => {
            partial.hotplug = Some(HotplugOptions {
                total_mib: h.total_size_mib,
                block_mib: h.block_size_mib,
                requested_mib: 0,
            });
            Ok(ApiResponse::Empty)
        }
        ApiRequest::PatchHotplugMemory(u) => {
            let h = partial
                .hotplug
                .as_mut()
                .ok_or_else(not_configured_hotplug)?;
            rules::hotplug_requested_size_mib(
                u.requested_size_mib,
                Some((h.total_mib, h.block_mib)),
            )
            .map_err(|e| ApiError::bad_request(e.for_api()))?;
            h.requested_mib = u.requested_size_mib;
            Ok(ApiResponse::Empty)
        }
        ApiRequest::GetInstanceInfo
        | ApiRequest::GetBalloon
        | ApiRequest::GetBalloonStats
        | ApiRequest::GetHotplugMemory
        | ApiRequest::GetResize
        | ApiRequest::GetMetrics => read(&request, partial),
        ApiRequest::Action(ActionType::FlushMetrics) => Ok(ApiResponse::Empty),
        other @ (ApiRequest::Action(_) | ApiRequest::PutResize(_) | ApiRequest::GetMemory(_)) => {
            Err(needs_running_vm(&other))
        }
    }
}

/// A GET before start: the configuration so far, no guest yet.
fn read(request: &ApiRequest, partial: &PartialConfig) -> ApiResult {
    let memory_mib = partial.memory_mib.unwrap_or(DEFAULT_MEMORY_MIB);
    match request {
        ApiRequest::GetInstanceInfo => Ok(ApiResponse::InstanceInfo(instance_info(
            InstanceState::NotStarted,
        ))),
        ApiRequest::GetBalloon => {
            let b = partial
                .balloon
                .as_ref()
                .ok_or_else(not_configured_balloon)?;
            Ok(ApiResponse::Balloon(BalloonState {
                amount_mib: b.amount_mib,
                deflate_on_oom: b.deflate_on_oom,
                stats_polling_interval_s: b.stats_interval_s as u16,
                free_page_reporting: b.free_page_reporting,
                target_pages: b.amount_mib << 8,
                actual_pages: 0,
                actual_mib: 0,
            }))
        }
        ApiRequest::GetBalloonStats => {
            // No guest, no report yet: the sizes only, as the document says.
            let b = partial
                .balloon
                .as_ref()
                .ok_or_else(not_configured_balloon)?;
            Ok(ApiResponse::BalloonStats(BalloonStats {
                target_pages: b.amount_mib << 8,
                target_mib: b.amount_mib,
                ..Default::default()
            }))
        }
        ApiRequest::GetHotplugMemory => {
            let h = partial
                .hotplug
                .as_ref()
                .ok_or_else(not_configured_hotplug)?;
            Ok(ApiResponse::HotplugMemory(HotplugMemoryState {
                total_size_mib: h.total_mib,
                block_size_mib: h.block_mib,
                plugged_size_mib: 0,
                requested_size_mib: h.requested_mib,
                usable_region_size_mib: 0,
            }))
        }
        ApiRequest::GetResize => Ok(ApiResponse::Resize(ResizeStatus {
            desired_mib: memory_mib,
            current_mib: memory_mib,
            mechanism: api::ResizeMechanism::None,
            state: api::ResizeState::Idle,
        })),
        // A scraper may start before the VM: only the server's own families until then.
        ApiRequest::GetMetrics => Ok(ApiResponse::Metrics(MetricsSnapshot::default())),
        other => Err(needs_running_vm(other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn machine(body: &str) -> ApiRequest {
        ApiRequest::PutMachineConfig(serde_json::from_str(body).unwrap())
    }

    #[test]
    fn huge_pages_set_thp_and_leaving_it_out_keeps_the_command_lines() {
        let mut p = PartialConfig {
            thp: Some(true),
            ..PartialConfig::default()
        };
        configure(machine(r#"{"vcpu_count": 1, "mem_size_mib": 64}"#), &mut p).unwrap();
        assert_eq!(p.thp, Some(true), "--thp stays when the body does not say");
        let none = r#"{"vcpu_count": 1, "mem_size_mib": 64, "huge_pages": "None"}"#;
        configure(machine(none), &mut p).unwrap();
        assert_eq!(p.thp, Some(false));
        let thp = r#"{"vcpu_count": 1, "mem_size_mib": 64, "huge_pages": "Transparent"}"#;
        configure(machine(thp), &mut p).unwrap();
        assert_eq!(p.thp, Some(true));
        assert_eq!((p.vcpus, p.memory_mib), (Some(1), Some(64)));
    }

    #[test]
    fn a_refused_request_changes_nothing() {
        let mut p = PartialConfig::default();
        let hot = api::HotplugMemoryConfig::new(256, 2);
        configure(ApiRequest::PutHotplugMemory(hot), &mut p).unwrap();
        let before = p.hotplug;
        let bad = api::HotplugMemoryUpdate {
            requested_size_mib: 300,
        };
        let e = configure(ApiRequest::PatchHotplugMemory(bad), &mut p).unwrap_err();
        assert_eq!(
            e.message,
            "requested_size_mib: 300 MiB is above total_size_mib: allowed 0 to 256 MiB in steps \
             of 2 MiB"
        );
        assert_eq!(p.hotplug, before);
    }

    #[test]
    fn start_refusals_are_in_the_apis_words() {
        let mut p = PartialConfig::default();
        let e = start_config(&p).unwrap_err();
        assert!(
            e.message.starts_with("kernel_image_path: no boot source"),
            "{e}"
        );
        p.kernel = Some("/k".into());
        p.memory_mib = Some(64);
        p.balloon = Some(BalloonOptions {
            amount_mib: 64,
            ..BalloonOptions::default()
        });
        assert_eq!(
            start_config(&p).unwrap_err().message,
            "amount_mib: 64 MiB is out of range: allowed 0 to 48 MiB (the boot memory, 64 MiB, \
             less the 16 MiB a guest keeps)"
        );
        p.balloon.as_mut().unwrap().amount_mib = 48;
        assert_eq!(start_config(&p).unwrap().memory_mib, 64);
    }
}
