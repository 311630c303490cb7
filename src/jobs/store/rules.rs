//! The rules every store follows, whatever its SQL: how a queue change repositions the waiting
//! jobs, what happens to a job whose run was interrupted, how a run starts and a job is canceled,
//! and how a stored row becomes a job to run (or a damaged one that fails instead of blocking the
//! queue). The backends only read and write rows; every decision about them is made here.

use std::collections::HashMap;

use super::records::StoredSettings;
use super::records::{Change, JobError, QueueEntry, StoreError};
use crate::audio::StemSource;
use crate::jobs::model::{ErrorCode, JobChange, JobState, JobStatus};
use crate::jobs::webhook::WebhookSpec;

/// Runs a job may begin without ending (its node died or stalled each time) before it is given up.
pub const MAX_INTERRUPTED_RUNS: u32 = 3;

/// Queue positions up to this are published exactly, each move of each job.
pub const EXACT_POSITIONS: u32 = 10;

/// Whether a waiting job shown at `shown` and now at `actual` gets a new status. Publishing every
/// move of every job made draining N queued jobs write and send N²/2 statuses (each claim moved
/// every job behind it); so a job's position is published exactly near the front of the queue,
/// and further back each time it has halved since it was last shown, or whenever it moved back.
/// A job's subscribers still see it move (about log₂ N + 10 times on its way through a queue of
/// N), a shown position is never below the real one, and a drain writes O(N log N) statuses.
pub fn position_is_news(shown: u32, actual: u32) -> bool {
    actual != shown && (actual <= EXACT_POSITIONS || actual > shown || actual * 2 <= shown)
}

/// A job in the queue, as the queue's order, its project and its shown position tell of it.
pub(super) struct Waiting<K> {
    pub key: K,
    /// When it joined the queue: the queue's order within its project.
    pub order: i64,
    pub project: String,
    /// The position its status shows; `None` for a job rejoining the queue (its run ended).
    pub shown: Option<u32>,
}

/// Each project's last claim, by a number every claim raises; a project not claimed since its
/// record went (or ever) is absent and counts as 0, the oldest.
pub(super) type LastClaims = HashMap<String, i64>;

/// The order the queue is claimed in, fair between projects: a free slot takes the oldest waiting
/// job of the project whose last claim is oldest (ties: the project waiting longest), and the
/// claim sends that project to the back of the rotation. So the queue runs in rounds, each
/// project's k-th waiting job in round k, a round's projects in the order of their last claims:
/// one project queueing many jobs delays another's next job by at most one mix per slot. The
/// stores' claim queries take the head of this order (`ORDER BY last_claim, queue_order`).
fn fair_order<K>(mut queue: Vec<Waiting<K>>, last_claims: &LastClaims) -> Vec<Waiting<K>> {
    queue.sort_by_key(|waiting| waiting.order);
    // A job's place: its round, its project's last claim and first waiting job, its own order.
    type Place = (u32, i64, i64, i64);
    let mut rounds: HashMap<&str, (u32, i64)> = HashMap::new();
    let keys: Vec<Place> = queue
        .iter()
        .map(|waiting| {
            let (round, first) = rounds.entry(waiting.project.as_str()).or_insert((0, waiting.order));
            let key = (*round, last_claims.get(&waiting.project).copied().unwrap_or(0), *first, waiting.order);
            *round += 1;
            key
        })
        .collect();
    let mut keyed: Vec<(Place, Waiting<K>)> = keys.into_iter().zip(queue).collect();
    keyed.sort_by_key(|(key, _)| *key);
    keyed.into_iter().map(|(_, waiting)| waiting).collect()
}

/// Which jobs of the queue get a new status, and at which 1-based position in the fair order:
/// every rejoining one, and each waiting one whose move is news ([`position_is_news`]).
pub(super) fn reposition<K>(queue: Vec<Waiting<K>>, last_claims: &LastClaims) -> Vec<(K, u32)> {
    fair_order(queue, last_claims)
        .into_iter()
        .zip(1..)
        .filter(|(waiting, position)| waiting.shown.is_none_or(|shown| position_is_news(shown, *position)))
        .map(|(waiting, position)| (waiting.key, position))
        .collect()
}

/// The place a job of `project` joining `queue` now takes in the fair order.
pub(super) fn place_of_new_job(queue: Vec<Waiting<()>>, project: &str, last_claims: &LastClaims) -> u32 {
    let mut queue: Vec<Waiting<bool>> =
        queue.into_iter().map(|waiting| Waiting { key: false, order: waiting.order, project: waiting.project, shown: waiting.shown }).collect();
    queue.push(Waiting { key: true, order: i64::MAX, project: project.to_string(), shown: None });
    fair_order(queue, last_claims).iter().position(|waiting| waiting.key).map_or(1, |at| at as u32 + 1)
}

/// The status of a job that has moved to `position`: re-queued if its run ended, else waiting.
pub(super) fn moved(entry: QueueEntry, position: u32) -> Option<Change> {
    let change = if entry.rejoining { JobChange::Requeued(position) } else { JobChange::QueuePosition(position) };
    entry.status.apply(change).ok().map(|next| Change::new(next, entry.webhook.as_ref(), false))
}

/// What happens to a job whose run ended without finishing it: `Ok` it rejoins the queue, `Err`
/// the change that gives it up after [`MAX_INTERRUPTED_RUNS`].
pub(super) fn after_interrupted_run(status: &JobStatus, webhook: Option<&WebhookSpec>, interrupted_runs: u32) -> Result<(), Change> {
    if interrupted_runs < MAX_INTERRUPTED_RUNS {
        return Ok(());
    }
    let message = format!("The node running this mix stopped {interrupted_runs} times; it was not run again");
    let failed = status.apply(JobChange::Failed { code: ErrorCode::Interrupted, message }).expect("an unfinished job can fail");
    Err(Change::new(failed, webhook, false))
}

/// The start of a claimed job's run number `attempt`.
pub(super) fn started(status: &JobStatus, webhook: Option<&WebhookSpec>, attempt: u32) -> Option<Change> {
    status.apply(JobChange::Started).ok().map(|next| Change::new(next, webhook, attempt == 1))
}

/// The end of a job whose run failed unexpectedly (it panicked); `None` when it has ended already.
pub(super) fn run_failed(status: &JobStatus, webhook: Option<&WebhookSpec>) -> Option<Change> {
    let failed = JobChange::Failed { code: ErrorCode::Internal, message: "The mix failed unexpectedly".into() };
    status.apply(failed).ok().map(|next| Change::new(next, webhook, false))
}

/// The end of a canceled job, or why it cannot be canceled.
pub(super) fn canceled(status: &JobStatus, webhook: Option<&WebhookSpec>) -> Result<Change, JobError> {
    status.apply(JobChange::canceled()).map(|next| Change::new(next, webhook, false)).map_err(|_| JobError::Finished)
}

pub(super) const TERMINAL_STATES: [&str; 2] = [JobState::Complete.as_str(), JobState::Error.as_str()];

/// A job's settings and stems as stored. Legacy settings stay unplanned: planning opens the
/// stems' files, which is no work for a transaction holding the queue's lock; the run plans them.
pub(super) fn parse_job_inputs(settings: &str, stems: &str, webhook: Option<&str>) -> Result<(StoredSettings, Vec<StemSource>, Option<WebhookSpec>), StoreError> {
    Ok((serde_json::from_str(settings)?, serde_json::from_str(stems)?, parse_webhook(webhook)?))
}

/// The webhook column.
pub(super) fn parse_webhook(webhook: Option<&str>) -> Result<Option<WebhookSpec>, StoreError> {
    Ok(webhook.map(serde_json::from_str).transpose()?)
}

/// What a queued job whose record cannot be run comes to: it ends in error rather than blocking
/// the queue.
pub(super) fn damaged(job_id: &str, status: &JobStatus, err: &StoreError) -> Change {
    tracing::error!(%job_id, %err, "a queued job's record cannot be run");
    let failed = status.apply(JobChange::Failed { code: ErrorCode::Internal, message: "The job's record is damaged".into() }).expect("a queued job can fail");
    Change::new(failed, None, false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_position_is_news_near_the_front_when_it_has_halved_or_when_it_moved_back() {
        let news: Vec<(u32, u32)> = [(11, 10), (10, 9), (2, 1), (40, 20), (40, 21), (40, 39), (13, 12), (5, 6), (30, 31), (7, 7), (100, 50), (100, 51)]
            .into_iter()
            .filter(|(shown, actual)| position_is_news(*shown, *actual))
            .collect();
        assert_eq!(news, [(11, 10), (10, 9), (2, 1), (40, 20), (5, 6), (30, 31), (100, 50)]);
    }

    /// Draining a queue of 40 from the front. Job j waits behind j - 1 others, so it is shown
    /// each place from min(j - 1, 10) down to 1; jobs 22 to 40 are also shown once on the way, at
    /// half their first place (11 to 20). That is 55 + 10 × 10 + 19 × 11 = 364 statuses, where
    /// publishing every move was 39 × 40 / 2 = 780.
    #[test]
    fn draining_a_queue_publishes_each_position_near_the_front_and_each_halving_further_back() {
        let mut queue: Vec<(i64, u32)> = (1..=40).map(|job| (job, job as u32)).collect();
        let mut published = 0;
        while !queue.is_empty() {
            queue.remove(0);
            let waiting = queue.iter().map(|&(order, shown)| Waiting { key: order, order, project: "p1".into(), shown: Some(shown) }).collect();
            for (order, position) in reposition(waiting, &LastClaims::new()) {
                published += 1;
                queue.iter_mut().find(|(o, _)| *o == order).unwrap().1 = position;
            }
            // Shown positions never understate: every job is shown at or behind its real place.
            assert!(queue.iter().zip(1..).all(|((_, shown), place)| *shown >= place));
        }
        assert_eq!(published, 364);
    }

    #[test]
    fn a_rejoining_job_is_always_repositioned_and_moves_the_queue_behind_it_back() {
        // Far back, "b" is shown ahead of its new place and moves back; "c" was shown well behind
        // its place and still is, which is not news.
        let waiting = |key, order, shown| Waiting { key, order, project: "p1".into(), shown };
        let mut queue = vec![waiting("a", 1, Some(1)), waiting("rejoining", 2, None)];
        queue.extend((3..=30).map(|order| waiting("", order, Some(order as u32 - 1))));
        queue.push(waiting("b", 31, Some(30)));
        queue.push(waiting("c", 32, Some(60)));
        let moved: Vec<(&str, u32)> = reposition(queue, &LastClaims::new()).into_iter().filter(|(key, position)| !key.is_empty() || *position > 30).collect();
        assert_eq!(moved, [("rejoining", 2), ("b", 31)]);
    }

    #[test]
    fn the_queue_runs_in_rounds_of_projects_ordered_by_their_last_claims() {
        // a (claimed last, at 2) queued 1-4, b (never claimed) 5-6, c (claimed at 1) 7.
        let projects = [("a", 1), ("a", 2), ("a", 3), ("a", 4), ("b", 5), ("b", 6), ("c", 7)];
        let queue = projects.iter().map(|&(project, order)| Waiting { key: order, order, project: project.into(), shown: Some(99) }).collect();
        let last_claims = LastClaims::from([("a".to_string(), 2), ("c".to_string(), 1)]);
        let order: Vec<i64> = reposition(queue, &last_claims).into_iter().map(|(order, _)| order).collect();
        assert_eq!(order, [5, 7, 1, 6, 2, 3, 4]);
        let queue: Vec<Waiting<()>> = projects.iter().map(|&(project, order)| Waiting { key: (), order, project: project.into(), shown: None }).collect();
        assert_eq!(place_of_new_job(queue, "d", &last_claims), 2, "after b's first, the oldest project never claimed, ahead of c's");
    }

    /// One slot, project a queues twenty jobs, then b queues one while a's first runs: b's job is
    /// the next claimed. With a queue of both, claims alternate while both wait.
    #[test]
    fn a_project_queueing_many_delays_another_s_next_job_by_at_most_one_mix_per_slot() {
        let mut queue: Vec<Waiting<(char, i64)>> = (1..=20).map(|order| Waiting { key: ('a', order), order, project: "a".into(), shown: None }).collect();
        let mut last_claims = LastClaims::new();
        let mut claims = 0;
        let mut claim = |queue: &mut Vec<Waiting<(char, i64)>>, last_claims: &mut LastClaims| {
            let head = fair_order(std::mem::take(queue), last_claims);
            let mut rest = head.into_iter();
            let first = rest.next().unwrap();
            claims += 1;
            last_claims.insert(first.project.clone(), claims);
            *queue = rest.collect();
            first.key
        };
        assert_eq!(claim(&mut queue, &mut last_claims), ('a', 1));
        queue.extend((21..=22).map(|order| Waiting { key: ('b', order), order, project: "b".into(), shown: None }));
        let next: Vec<(char, i64)> = (0..5).map(|_| claim(&mut queue, &mut last_claims)).collect();
        assert_eq!(next, [('b', 21), ('a', 2), ('b', 22), ('a', 3), ('a', 4)]);
    }
}
