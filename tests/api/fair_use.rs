//! Fair use: the queue is fair between projects, a project's queue is capped, a mix's length is
//! capped, and state changes are rate-limited per client; each refusal counted in `/metrics`.

use serde_json::{json, Value};

use crate::helpers::{eventually_async, spawn_app_with, SseStream, TestApp, ADMIN_KEY};

async fn project_with_a_stem(app: &TestApp, project: &str, seconds: u32) {
    let stem = app.fixture(&format!("{project}.wav"), &format!("sine=f=440:r=48000:d={seconds}"), &[]);
    assert_eq!(app.upload(project, &[&stem]).await.0, 201);
}

async fn start(app: &TestApp, project: &str) -> String {
    let (status, started) = app.start_mix(project, None).await;
    assert_eq!(status, 202, "{started}");
    started["data"]["job_id"].as_str().unwrap().to_string()
}

/// The jobs of a global stream in the order they began to run, until `jobs` have completed.
pub(crate) async fn run_order(stream: &mut SseStream, jobs: usize) -> Vec<String> {
    let (mut order, mut complete) = (Vec::new(), 0);
    while complete < jobs {
        let event = stream.next_event().await.expect("the global stream stays open");
        if event.event.as_deref() != Some("status") {
            continue;
        }
        let status: Value = serde_json::from_str(&event.data).unwrap();
        let job_id = status["job_id"].as_str().unwrap().to_string();
        match status["state"].as_str().unwrap() {
            "running" if !order.contains(&job_id) => order.push(job_id),
            "complete" => complete += 1,
            "error" => panic!("a job failed: {status}"),
            _ => {}
        }
    }
    order
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_one_slot_a_project_queueing_many_delays_another_by_one_mix_at_most() {
    let app = spawn_app_with(|config| config.mix_slots = Some(1)).await;
    project_with_a_stem(&app, "pa", 2).await;
    project_with_a_stem(&app, "pb", 2).await;
    let mut stream = SseStream::connect(&app.client, &app.url("/events"), None).await;
    let mut a = Vec::new();
    for _ in 0..4 {
        a.push(start(&app, "pa").await);
    }
    let b = start(&app, "pb").await;
    // pa's first job took the slot (or, not yet claimed, is the oldest of all); pb has never been
    // claimed, so its job goes next, ahead of pa's three others.
    let order = run_order(&mut stream, 5).await;
    assert_eq!(order, [a[0].clone(), b, a[1].clone(), a[2].clone(), a[3].clone()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_job_s_position_follows_the_fair_order() {
    // No slots: nothing runs, so the queue stays as submitted.
    let app = spawn_app_with(|config| config.mix_slots = Some(0)).await;
    project_with_a_stem(&app, "pa", 1).await;
    project_with_a_stem(&app, "pb", 1).await;
    let a: Vec<String> = futures_util::future::join_all((0..3).map(|_| start(&app, "pa"))).await;
    let b = start(&app, "pb").await;
    // Rounds: pa's first, pb's first (never claimed either; pa's waited longer), then pa's others,
    // which went back behind pb's first: their new places are published.
    let positions = || async {
        let mut positions = Vec::new();
        for (project, job) in a.iter().map(|job| ("pa", job)).chain([("pb", &b)]) {
            positions.push(app.get_json(&format!("/mix/{project}/mix/job/{job}/status")).await.1["data"]["queue_position"].as_u64().unwrap());
        }
        positions
    };
    eventually_async("the positions follow the fair order", || async { positions().await[3] == 2 && positions().await[..3].iter().max() == Some(&4) }).await;
    let mut shown = positions().await;
    let b_place = shown.pop();
    shown.sort();
    assert_eq!((shown, b_place), (vec![1, 3, 4], Some(2)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_project_s_queue_is_capped_with_429_and_retry_after_and_the_refusal_is_counted() {
    let app = spawn_app_with(|config| {
        config.mix_slots = Some(0);
        config.max_queued_per_project = 2;
    })
    .await;
    project_with_a_stem(&app, "pa", 1).await;
    project_with_a_stem(&app, "pb", 1).await;
    start(&app, "pa").await;
    start(&app, "pa").await;
    let response = app.client.post(app.url("/mix/pa/mix/start")).send().await.unwrap();
    assert_eq!((response.status().as_u16(), response.headers()["retry-after"].to_str().unwrap()), (429, "30"));
    let body: Value = response.json().await.unwrap();
    assert_eq!(
        (body["error"].as_str(), body["message"].as_str()),
        (Some("TOO_MANY_JOBS"), Some("This project already has 2 mix jobs waiting, the most one may; start another once one of them has begun"))
    );
    // Another project has its own cap; a repeat of a start that was queued is still its job.
    start(&app, "pb").await;
    let metrics = app.client.get(app.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("mixd_refusals_total{code=\"TOO_MANY_JOBS\"} 1\n"), "{metrics}");
    assert!(metrics.contains("mixd_queued_jobs_by_project{project=\"pa\"} 2\nmixd_queued_jobs_by_project{project=\"pb\"} 1\n"), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mix_longer_than_the_server_allows_is_refused_at_start() {
    let app = spawn_app_with(|config| {
        config.mix_slots = Some(0);
        config.max_mix_minutes = 1;
    })
    .await;
    project_with_a_stem(&app, "pa", 2).await;
    let offset = |ms: u32| json!({"tracks": {"pa.wav": {"offset_ms": ms}}});
    let (status, refused) = app.start_mix("pa", Some(offset(58_500))).await;
    assert_eq!((status, refused["error"].as_str()), (422, Some("INVALID_SETTINGS")), "{refused}");
    assert_eq!(
        refused["message"],
        "Invalid settings: the mix would last 1.0 minutes (its latest-ending stem, after offsets); this server mixes at most 1 (--max-mix-minutes)"
    );
    assert_eq!(app.start_mix("pa", Some(offset(57_000))).await.0, 202, "59 s is within the minute");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_changes_are_rate_limited_per_client_with_the_ietf_headers_and_reads_never_are() {
    let app = spawn_app_with(|config| {
        config.api_keys.clear();
        config.token_keys.token_keys.clear();
        config.rate_limit = Some(mixd::config::RateLimit::parse("2/m").unwrap());
    })
    .await;
    project_with_a_stem(&app, "pa", 1).await;
    // The upload was the first state change of this address.
    let delete = || app.client.delete(app.url("/projects/pa/stems/00000000-0000-4000-8000-000000000000")).send();
    let second = delete().await.unwrap();
    assert_eq!(second.status(), 404, "allowed, and answered by the route");
    assert_eq!(second.headers()["ratelimit-policy"], "\"default\";q=2;w=60");
    assert_eq!(second.headers()["ratelimit"], "\"default\";r=0;t=60");
    let third = delete().await.unwrap();
    assert_eq!(third.status(), 429);
    let retry_after: u64 = third.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=30).contains(&retry_after), "the next request is due within 30 s: {retry_after}");
    assert_eq!((third.headers()["ratelimit-policy"].to_str().unwrap(), third.headers()["ratelimit"].to_str().unwrap()), ("\"default\";q=2;w=60", "\"default\";r=0;t=60"));
    let body: Value = third.json().await.unwrap();
    assert_eq!(body["error"], "RATE_LIMITED");
    // Reads are never limited, and carry no rate-limit headers.
    for _ in 0..5 {
        let read = app.client.get(app.url("/projects/pa/stems")).send().await.unwrap();
        assert_eq!(read.status(), 200);
        assert!(read.headers().get("ratelimit").is_none());
    }
    let metrics = app.client.get(app.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("mixd_refusals_total{code=\"RATE_LIMITED\"} 1\n"), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_token_has_its_own_rate_and_admin_keys_are_not_limited() {
    let app = spawn_app_with(|config| config.rate_limit = Some(mixd::config::RateLimit::parse("1/m").unwrap())).await;
    let mint = |subject: &'static str| {
        let app = &app;
        async move {
            let body = json!({"project_id": "pa", "scope": "write", "ttl_s": 600, "subject": subject});
            app.client.post(app.url("/tokens")).json(&body).send().await.unwrap().json::<Value>().await.unwrap()["data"]["token"].as_str().unwrap().to_string()
        }
    };
    let (first, second) = (mint("first").await, mint("second").await);
    let start_with = |credential: String| {
        let app = &app;
        async move { app.client.post(app.url("/mix/pa/mix/start")).bearer_auth(credential).send().await.unwrap().status().as_u16() }
    };
    // The project has no stems: the route answers 404, which still counts as a state change.
    assert_eq!(start_with(first.clone()).await, 404);
    assert_eq!(start_with(first).await, 429);
    assert_eq!(start_with(second).await, 404, "another token has its own budget");
    for _ in 0..3 {
        assert_eq!(start_with(ADMIN_KEY.to_string()).await, 404);
    }
}

/// The stem files (audio and records) in a project's directory.
fn stem_files(app: &TestApp, project: &str) -> usize {
    std::fs::read_dir(app.data_dir.path().join(project).join("stems")).map_or(0, |entries| entries.count())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_past_the_project_quota_is_refused_413_and_nothing_of_it_is_kept() {
    let fixtures = tempfile::tempdir().unwrap();
    let stem = |name: &str| crate::helpers::make_audio(fixtures.path(), name, "sine=f=440:r=48000:d=1", &["-ac", "2"]);
    let (one, two, three) = (stem("one.wav"), stem("two.wav"), stem("three.wav"));
    let size = std::fs::metadata(&one).unwrap().len();
    // Room for two of them, not three.
    let quota_gb = 2.5 * size as f64 / 1e9;
    let app = spawn_app_with(|config| config.project_quota_gb = Some(quota_gb)).await;
    assert_eq!(app.upload("pa", &[&one]).await.0, 201);
    let before = stem_files(&app, "pa");
    let (status, refused) = app.upload("pa", &[&two, &three]).await;
    assert_eq!((status, refused["error"].as_str()), (413, Some("QUOTA_EXCEEDED")), "{refused}");
    assert_eq!(refused["message"], format!("This upload would take the project's stems past its quota of {quota_gb} GB: delete stems to make room"));
    // Nothing of the refused request is kept: not the file that fitted, nor the one that did not.
    let (_, listed) = app.get_json("/projects/pa/stems").await;
    assert_eq!(listed["data"]["stems"].as_array().unwrap().len(), 1);
    assert_eq!(stem_files(&app, "pa"), before);
    // Another project has a quota of its own; a delete makes room again.
    assert_eq!(app.upload("pb", &[&one, &two, &three]).await.0, 413, "pb is held to a quota of its own");
    assert_eq!(app.upload("pb", &[&two]).await.0, 201);
    let stem_id = listed["data"]["stems"][0]["stem_id"].as_str().unwrap().to_string();
    assert_eq!(app.client.delete(app.url(&format!("/projects/pa/stems/{stem_id}"))).send().await.unwrap().status(), 200);
    assert_eq!(app.upload("pa", &[&two, &three]).await.0, 201);
    let metrics = app.client.get(app.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("mixd_refusals_total{code=\"QUOTA_EXCEEDED\"} 2\n"), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_at_once_to_a_new_project_are_each_counted_and_none_is_refused_under_the_quota() {
    let fixtures = tempfile::tempdir().unwrap();
    let stem = crate::helpers::make_audio(fixtures.path(), "one.wav", "sine=f=440:r=8000:d=0.1", &[]);
    let size = std::fs::metadata(&stem).unwrap().len();
    const AT_ONCE: usize = 8;
    // Room for exactly the uploads at once, and not one more.
    let quota_gb = (AT_ONCE as f64 + 0.5) * size as f64 / 1e9;
    let app = spawn_app_with(|config| config.project_quota_gb = Some(quota_gb)).await;
    // No project has its usage on record yet: the first refusals find no record, and each must ask
    // again once another upload has started it, not answer QUOTA_EXCEEDED. Many projects, so that
    // the race is run many times.
    for project in (0..24).map(|n| format!("fresh-{n}")) {
        let statuses: Vec<u16> = futures_util::future::join_all((0..AT_ONCE).map(|_| async { app.upload(&project, &[&stem]).await.0 })).await;
        assert_eq!(statuses, vec![201; AT_ONCE], "{project}");
        let (status, refused) = app.upload(&project, &[&stem]).await;
        assert_eq!((status, refused["error"].as_str()), (413, Some("QUOTA_EXCEEDED")), "{refused}");
    }
}
