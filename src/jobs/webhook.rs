//! A job's webhook, and the deliveries its changes cause. A delivery is created in the same
//! database transaction as the status change that causes it (see `store`), so a crash can lose
//! neither: this is the outbox the dispatcher in `crate::webhooks` drains.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::model::{JobEvent, JobState};
use crate::ids::{JobId, Timestamp};

/// Where a job's notifications go, as `POST .../mix/start` carries it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WebhookSpec {
    /// An http(s) URL that does not reach this machine or a private network.
    pub url: String,
    /// `start` (the job first runs) and/or `completed` (it ends in `complete` or `error`).
    #[serde(default = "default_events")]
    pub events: Vec<WebhookEvent>,
}

fn default_events() -> Vec<WebhookEvent> {
    vec![WebhookEvent::Completed]
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum WebhookEvent {
    Start,
    Completed,
}

impl WebhookEvent {
    pub fn message_type(self) -> &'static str {
        match self {
            WebhookEvent::Start => "mix.started",
            WebhookEvent::Completed => "mix.completed",
        }
    }
}

/// One message to one receiver, sent until it succeeds, is refused for good, or runs out of retries.
#[derive(Debug, Clone, PartialEq)]
pub struct Delivery {
    /// The `webhook-id`: the same on every retry, so a receiver can drop repeats.
    pub id: String,
    pub job_id: JobId,
    pub url: String,
    pub message_type: &'static str,
    /// Fixed when the delivery is made: every retry sends the same bytes.
    pub body: String,
}

impl Delivery {
    /// The delivery `event` causes for a job with `webhook`, if any. `first_run`: the job has
    /// not been started before (a run after a restart is not a new start).
    pub fn caused_by(webhook: &WebhookSpec, event: &JobEvent, first_run: bool) -> Option<Delivery> {
        let state = event.status.state();
        let kind = if state == JobState::Running && first_run {
            WebhookEvent::Start
        } else if state.is_terminal() {
            WebhookEvent::Completed
        } else {
            return None;
        };
        if !webhook.events.contains(&kind) {
            return None;
        }
        let timestamp = serde_json::to_string(&Timestamp::now()).expect("a timestamp serialises");
        Some(Delivery {
            id: format!("msg_{}", uuid::Uuid::new_v4().simple()),
            job_id: event.status.job_id(),
            url: webhook.url.clone(),
            message_type: kind.message_type(),
            body: format!(r#"{{"type":"{}","timestamp":{timestamp},"data":{}}}"#, kind.message_type(), event.json),
        })
    }
}

/// What one attempt to deliver came to, as `GET .../webhooks` lists it.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct Attempt {
    /// The `webhook-id` of the delivery.
    pub webhook_id: String,
    #[serde(rename = "type")]
    pub message_type: String,
    /// Where it was sent. A caller with only read rights on the project sees the origin and path
    /// only: a receiver's secret may ride in the query or the userinfo.
    pub url: String,
    /// 1 for the first attempt of a delivery.
    pub attempt: u32,
    /// RFC 3339.
    pub attempted_at: String,
    /// The receiver's HTTP status, when it answered.
    pub http_status: Option<u16>,
    /// Why the attempt failed without an answer (timeout, refused address, connection error).
    pub error: Option<String>,
    /// RFC 3339, when another attempt is due; null when this one ended the delivery.
    pub next_attempt_at: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobs::model::{ErrorCode, JobChange, JobStatus};

    #[test]
    fn a_job_causes_a_start_on_its_first_run_and_a_completion_at_its_end() {
        let webhook = WebhookSpec { url: "https://example.com/hook".into(), events: vec![WebhookEvent::Start, WebhookEvent::Completed] };
        let queued = JobStatus::queued(JobId::new(), "p1".parse().unwrap(), 1);
        assert_eq!(Delivery::caused_by(&webhook, &JobEvent::new(queued.clone()), true), None);
        let running = JobEvent::new(queued.apply(JobChange::Started).unwrap());
        let start = Delivery::caused_by(&webhook, &running, true).unwrap();
        assert_eq!(start.message_type, "mix.started");
        let body: serde_json::Value = serde_json::from_str(&start.body).unwrap();
        assert_eq!((body["type"].as_str(), body["data"]["state"].as_str()), (Some("mix.started"), Some("running")));
        assert_eq!(Delivery::caused_by(&webhook, &running, false), None, "a re-run is not a new start");
        let failed = JobEvent::new(running.status.apply(JobChange::Failed { code: ErrorCode::Canceled, message: "x".into() }).unwrap());
        assert_eq!(Delivery::caused_by(&webhook, &failed, false).unwrap().message_type, "mix.completed");
        let completed_only: WebhookSpec = serde_json::from_str(r#"{"url": "https://example.com/hook"}"#).unwrap();
        assert_eq!(Delivery::caused_by(&completed_only, &running, true), None, "events default to completed");
    }
}
