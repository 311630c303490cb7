// The mixd dashboard. It speaks only the public contract (shared/CONTRACT.md): the envelope
// routes, the live streams (js/live.js), and /media for results and their analysis. All page
// state lives in `page`; views render from it.

import { api, explain, FRIENDLY, isFinished, STAGES, STAGE_LABELS, whenUnauthorized } from './js/api.js';
import { drawLoudness, drawSpectrum, drawWaveform, loadAnalysis } from './js/analysis.js';
import { LiveFeed } from './js/live.js';

const $ = (selector, root = document) => root.querySelector(selector);
/** How long a finished job stays in the overview, marked done or failed. */
const OVERVIEW_KEEP_MS = 10 * 60 * 1000;

const page = {
  project: null,
  /** Bumped by every project switch: an answer for an earlier project is dropped. */
  generation: 0,
  /** Settles when the page knows its project: files picked before that wait for it. */
  opened: null,
  /** Bumped by every stems request: an answer overtaken by a later one is dropped. */
  stemsRequest: 0,
  stems: [],
  tracks: {},
  jobs: new Map(),
  live: null,
  pendingStartKey: null,
  projects: [],
  /** Two finished jobs to compare, by id. */
  compare: [],
  overview: new Map(),
};

/** Says `text` to screen readers, politely: stage changes, not every percent. */
function announce(text) {
  $('#announcer').textContent = text;
}

// ---- projects ----

async function loadProjects() {
  const answer = await api('GET', '/projects');
  if (!answer.ok) return;
  page.projects = answer.data.projects;
  renderProjects();
}

function renderProjects() {
  const filter = $('#project-search').value.trim().toLowerCase();
  const shown = page.projects.filter((p) => p.project_id.toLowerCase().includes(filter));
  $('#project-list').replaceChildren(...shown.map((project) => {
    const item = document.createElement('li');
    const button = document.createElement('button');
    button.type = 'button';
    button.className = 'project-pick';
    button.dataset.project = project.project_id;
    if (project.project_id === page.project) button.setAttribute('aria-current', 'true');
    const state = project.newest_job ? STAGE_LABELS[project.newest_job.state] : 'No mixes';
    const stems = `${project.stems} stem${project.stems === 1 ? '' : 's'}`;
    button.append(Object.assign(document.createElement('strong'), { textContent: project.project_id }), ` ${stems} · ${state}`);
    button.addEventListener('click', () => openProject(project.project_id));
    item.append(button);
    return item;
  }));
  $('#recent-projects').replaceChildren(...page.projects.map((p) => Object.assign(document.createElement('option'), { value: p.project_id })));
  $('#no-projects').hidden = shown.length > 0;
}

async function openProject(id) {
  page.live?.stop();
  page.live = null;
  page.project = id;
  const generation = ++page.generation;
  page.jobs.clear();
  page.compare = [];
  page.tracks = JSON.parse(localStorage.getItem(`mixd.tracks.${id}`) || '{}');
  $('#jobs').replaceChildren();
  $('#uploads').replaceChildren();
  $('#mix-error').textContent = '';
  $('#project-id').value = id;
  $('#workspace').hidden = false;
  renderCompare();
  renderProjects();
  if (location.hash !== `#${id}`) history.replaceState(null, '', `#${id}`);
  await Promise.all([loadStems(generation), loadJobs(generation)]);
  if (generation === page.generation) connectLive();
}

async function loadStems(generation = page.generation) {
  const request = ++page.stemsRequest;
  const answer = await api('GET', `/projects/${page.project}/stems`);
  if (generation !== page.generation || request !== page.stemsRequest) return;
  page.stems = answer.ok ? answer.data.stems : [];
  renderStems();
}

async function loadJobs(generation = page.generation) {
  const project = page.project;
  const answer = await api('GET', `/mix/${project}/mix/jobs`);
  if (!answer.ok || generation !== page.generation) return;
  for (const status of answer.data.jobs.slice().reverse()) upsertJob(status);
}

// ---- stems ----

function formatDuration(seconds) {
  const m = Math.floor(seconds / 60);
  const s = (seconds % 60).toFixed(1).padStart(4, '0');
  return `${m}:${s}`;
}

function trackOf(stem) {
  page.tracks[stem.stem_id] ??= { gain_db: 0, pan: 0, mute: false, solo: false };
  page.tracks[stem.stem_id].level_lu ??= 0;
  return page.tracks[stem.stem_id];
}

function saveTracks() {
  localStorage.setItem(`mixd.tracks.${page.project}`, JSON.stringify(page.tracks));
}

function renderStems() {
  const rows = page.stems.map((stem) => {
    const track = trackOf(stem);
    const row = document.createElement('tr');
    const channels = stem.channels === 1 ? 'mono' : stem.channels === 2 ? 'stereo' : `${stem.channels} ch`;
    row.innerHTML = `
      <td class="stem-name"></td>
      <td>${stem.format.toUpperCase()} · ${(stem.sample_rate / 1000).toFixed(1)} kHz · ${channels}</td>
      <td>${formatDuration(stem.duration_s)}</td>
      <td><input type="number" min="-96" max="48" step="0.5" aria-label="Gain"></td>
      <td><input type="number" min="-40" max="40" step="1" aria-label="Level"></td>
      <td><input type="range" min="-1" max="1" step="0.05" aria-label="Pan"></td>
      <td><input type="checkbox" aria-label="Mute"></td>
      <td><input type="checkbox" aria-label="Solo"></td>
      <td><button type="button" aria-label="Remove">✕</button></td>`;
    const name = $('.stem-name', row);
    name.textContent = stem.name;
    name.title = stem.name;
    const [gain, level, pan, mute, solo] = row.querySelectorAll('input');
    gain.value = track.gain_db;
    level.value = track.level_lu;
    pan.value = track.pan;
    mute.checked = track.mute;
    solo.checked = track.solo;
    for (const input of [gain, level, pan, mute, solo]) input.setAttribute('aria-label', `${input.getAttribute('aria-label')} of ${stem.name}`);
    gain.addEventListener('change', () => { track.gain_db = Number(gain.value); saveTracks(); });
    level.addEventListener('change', () => { track.level_lu = Number(level.value); saveTracks(); });
    pan.addEventListener('input', () => { track.pan = Number(pan.value); saveTracks(); });
    mute.addEventListener('change', () => { track.mute = mute.checked; saveTracks(); });
    solo.addEventListener('change', () => { track.solo = solo.checked; saveTracks(); });
    $('button', row).addEventListener('click', async () => {
      const answer = await api('DELETE', `/projects/${page.project}/stems/${stem.stem_id}`);
      if (!answer.ok) $('#mix-error').textContent = explain(answer);
      await loadStems();
    });
    return row;
  });
  $('#stems-table tbody').replaceChildren(...rows);
  renderReferenceChoice();
  $('#stems-table').hidden = rows.length === 0;
  $('#no-stems').hidden = rows.length > 0;
}

function uploadFile(file) {
  const item = document.createElement('li');
  const label = document.createElement('span');
  label.textContent = file.name;
  const bar = Object.assign(document.createElement('progress'), { max: 100, value: 0 });
  bar.setAttribute('aria-label', `Uploading ${file.name}`);
  item.append(label, bar);
  $('#uploads').append(item);
  return new Promise((resolve) => {
    const form = new FormData();
    form.append('file', file, file.name);
    const xhr = new XMLHttpRequest();
    xhr.open('POST', `/projects/${page.project}/stems`);
    xhr.upload.addEventListener('progress', (event) => {
      if (event.lengthComputable) bar.value = Math.round((event.loaded / event.total) * 100);
    });
    const fail = (message) => {
      item.className = 'failed';
      item.replaceChildren(`${file.name}: ${message}`);
      resolve(false);
    };
    xhr.addEventListener('load', () => {
      let answer;
      try { answer = JSON.parse(xhr.responseText); } catch { return fail(`unexpected answer (${xhr.status})`); }
      if (!answer.ok) return fail(explain({ ...answer, retryAfter: xhr.getResponseHeader('retry-after') }));
      item.className = 'done';
      item.replaceChildren(`${file.name}: added`);
      resolve(true);
    });
    xhr.addEventListener('error', () => fail('the upload was interrupted. Check your connection and try again.'));
    xhr.send(form);
  });
}

async function uploadFiles(fileList) {
  // Copied first: the input is cleared as soon as this returns its promise.
  const files = [...fileList];
  await page.opened;
  if (!page.project || files.length === 0) return;
  const results = await Promise.all(files.map(uploadFile));
  if (results.some(Boolean)) {
    await loadStems();
    connectLive();
    loadProjects();
  }
}

// ---- mixing ----

/** The reference picker offers the project's stems, keeping the choice while it still exists. */
function renderReferenceChoice() {
  const select = $('#reference');
  const chosen = select.value;
  const options = page.stems.map((stem) => Object.assign(document.createElement('option'), { value: stem.stem_id, textContent: stem.name }));
  select.replaceChildren(Object.assign(document.createElement('option'), { value: '', textContent: 'None' }), ...options);
  select.value = page.stems.some((stem) => stem.stem_id === chosen) ? chosen : '';
  referenceChanged();
}

/** With a reference the master takes its loudness: the target is not sent. */
function referenceChanged() {
  const matching = $('#reference').value !== '';
  $('#target-lufs').disabled = matching;
  $('#target-lufs').title = matching ? "The reference's loudness" : '';
}

function mixSettings() {
  const reference = $('#reference').value;
  const balance = $('#auto-balance').checked;
  const tracks = {};
  // The reference is played by no track; level_lu means something only with balance.
  for (const stem of page.stems) {
    if (stem.stem_id === reference) continue;
    const { level_lu: level, ...track } = trackOf(stem);
    tracks[stem.stem_id] = balance ? { ...track, level_lu: level } : track;
  }
  const master = { true_peak_dbtp: Number($('#true-peak').value) };
  if (reference) master.reference = reference; else master.target_lufs = Number($('#target-lufs').value);
  return { tracks, auto: { balance }, master, output: { bit_depth: Number($('#bit-depth').value) } };
}

async function startMix(event) {
  event.preventDefault();
  const button = $('#start-mix');
  // One key per intent: a double click, or a retry after a lost answer, starts one mix.
  page.pendingStartKey ??= crypto.randomUUID();
  button.disabled = true;
  $('#mix-error').textContent = '';
  const answer = await api('POST', `/mix/${page.project}/mix/start`, {
    body: JSON.stringify(mixSettings()),
    headers: { 'Content-Type': 'application/json', 'Idempotency-Key': page.pendingStartKey },
  });
  button.disabled = false;
  if (answer.error === 'NETWORK') {
    $('#mix-error').textContent = explain(answer);
    return;
  }
  page.pendingStartKey = null;
  if (!answer.ok) {
    $('#mix-error').textContent = explain(answer);
    return;
  }
  const { links, ...status } = answer.data;
  upsertJob(status);
  connectLive();
  loadProjects();
}

// ---- jobs ----

function upsertJob(status) {
  if (status.project_id !== page.project) return;
  const known = page.jobs.get(status.job_id);
  if (known && known.status.seq >= status.seq) return;
  let node = known?.node;
  if (!node) {
    node = $('#job-template').content.firstElementChild.cloneNode(true);
    const timeline = $('.timeline', node);
    for (const stage of STAGES.slice(2, 8)) {
      const step = document.createElement('li');
      step.dataset.stage = stage;
      step.textContent = STAGE_LABELS[stage];
      timeline.append(step);
    }
    $('.cancel', node).addEventListener('click', () => cancelJob(status.job_id));
    $('.compare-pick', node).addEventListener('change', (event) => pickForCompare(status.job_id, event.target.checked));
    $('#jobs').prepend(node);
  }
  if (!known || known.status.state !== status.state) announce(`Mix ${STAGE_LABELS[status.state].toLowerCase()}${status.state === 'queued' ? '' : ` (${status.progress}%)`}`);
  page.jobs.set(status.job_id, { status, node });
  renderJob(node, status);
  $('#no-jobs').hidden = page.jobs.size > 0;
}

async function cancelJob(jobId) {
  const answer = await api('DELETE', `/mix/${page.project}/mix/job/${jobId}`);
  if (answer.ok) upsertJob(answer.data);
  else if (answer.error !== 'JOB_FINISHED') $('#mix-error').textContent = explain(answer);
}

function renderJob(node, status) {
  node.dataset.state = status.state;
  node.dataset.jobId = status.job_id;
  $('.job-state', node).textContent = STAGE_LABELS[status.state] ?? status.state;
  const bar = $('.job-progress', node);
  bar.value = status.progress;
  bar.setAttribute('aria-label', `Mix progress ${status.progress}%`);
  let message = status.message;
  if (status.state === 'queued' && status.queue_position) message = `Waiting for a free mixer (position ${status.queue_position})`;
  if (status.state === 'error') message = FRIENDLY[status.error_code] && status.error_code !== 'INTERNAL'
    ? `${FRIENDLY[status.error_code]} ${status.error_code === 'CANCELED' ? '' : status.error}` : explain({ error: status.error_code, message: status.error });
  $('.job-message', node).textContent = message.trim();
  const rank = STAGES.indexOf(status.state);
  for (const step of node.querySelectorAll('.timeline li')) {
    const stepRank = STAGES.indexOf(step.dataset.stage);
    step.classList.toggle('done', rank > stepRank);
    step.classList.toggle('current', rank === stepRank);
  }
  $('.cancel', node).hidden = isFinished(status);
  $('.compare-label', node).hidden = status.state !== 'complete';
  updateElapsed(node, status);
  if (status.state === 'complete' && $('.result', node).hidden) showResult(node, status);
}

function updateElapsed(node, status) {
  const end = isFinished(status) ? Date.parse(status.updated_at) : Date.now();
  const seconds = Math.max(0, (end - Date.parse(status.created_at)) / 1000);
  $('.job-time', node).textContent = `${seconds.toFixed(0)} s`;
}

function reportRows(report = {}) {
  const number = (value, unit, digits = 1) => (value === null || value === undefined ? '–' : `${value.toFixed(digits)} ${unit}`);
  return [
    ['Loudness', number(report.integrated_lufs, 'LUFS')],
    ['True peak', number(report.true_peak_dbtp, 'dBTP')],
    ['Loudness range', number(report.loudness_range_lu, 'LU')],
    ['Length', report.duration_s !== undefined ? formatDuration(report.duration_s) : '–'],
    ['Format', `${(report.sample_rate / 1000).toFixed(1)} kHz · ${report.bit_depth}-bit`],
    ...referenceRows(report.reference),
    ...(report.stems || []).filter((stem) => stem.auto_gain_db !== null && stem.auto_gain_db !== undefined).map((stem) => [
      `Auto gain · ${stem.name}`,
      `${stem.auto_gain_db >= 0 ? '+' : ''}${stem.auto_gain_db.toFixed(1)} dB (${number(stem.loudness_lufs, 'LUFS')} as uploaded)`,
    ]),
  ].map(([term, value]) => {
    const div = document.createElement('div');
    div.append(Object.assign(document.createElement('dt'), { textContent: term }), Object.assign(document.createElement('dd'), { textContent: value }));
    return div;
  });
}

/** How close the master came to its reference: tonal error and width, before and after. */
function referenceRows(reference) {
  if (!reference) return [];
  const figure = (value, unit = '') => (value === null || value === undefined ? '–' : `${value.toFixed(2)}${unit}`);
  return [
    ['Reference', `${reference.name} · ${reference.integrated_lufs.toFixed(1)} LUFS`],
    ['Tonal match', `${figure(reference.spectral_error_db_before, ' dB')} → ${figure(reference.spectral_error_db_after, ' dB')} off the reference`],
    ['Width (side/mid)', `${figure(reference.width_ratio_before)} → ${figure(reference.width_ratio_after)}, reference ${figure(reference.width_ratio_reference)}`],
  ];
}

/** The file a player should stream: the smallest lossy one, else the first delivered. */
function playable(status) {
  const lossy = (status.results || []).filter((file) => file.format === 'opus' || file.format === 'mp3');
  lossy.sort((a, b) => a.bytes - b.bytes);
  return lossy.length ? lossy[0].url : status.result_url;
}

function formatBytes(bytes) {
  return bytes >= 1e6 ? `${(bytes / 1e6).toFixed(1)} MB` : `${Math.max(1, Math.round(bytes / 1e3))} kB`;
}

/** One line per delivered file: a download link with its size, and its loudness as decoded. */
function downloadItems(status) {
  const number = (value, unit) => (value === null || value === undefined ? '–' : `${value.toFixed(1)} ${unit}`);
  return (status.results || [{ format: 'wav', url: status.result_url }]).map((file) => {
    const item = document.createElement('li');
    const link = Object.assign(document.createElement('a'), { href: file.url, textContent: file.format.toUpperCase() });
    link.download = `${status.project_id}-${status.job_id.slice(0, 8)}.${file.format}`;
    link.dataset.format = file.format;
    const figures = file.bytes ? ` ${formatBytes(file.bytes)} · ${number(file.integrated_lufs, 'LUFS')} · ${number(file.true_peak_dbtp, 'dBTP')}` : '';
    item.append(link, figures);
    return item;
  });
}

async function showResult(node, status) {
  const result = $('.result', node);
  result.hidden = false;
  $('.player', node).src = playable(status);
  const download = $('.download', node);
  download.href = status.result_url;
  const first = (status.results && status.results[0]?.format) || 'wav';
  download.textContent = `Download ${first.toUpperCase()}`;
  download.download = `${status.project_id}-${status.job_id.slice(0, 8)}.${first}`;
  $('.downloads', node).replaceChildren(...downloadItems(status));
  $('.report', node).replaceChildren(...reportRows(status.report));
  try {
    const analysis = await loadAnalysis(status.result_url);
    drawWaveform($('.waveform', node), analysis);
    drawLoudness($('.loudness', node), analysis, status.report?.reference ? status.report.reference.integrated_lufs : Number($('#target-lufs').value));
    drawSpectrum($('.spectrum', node), analysis);
    $('.limiter-note', node).textContent = analysis.ceiling_hit_count
      ? `The limiter held the ceiling in ${analysis.ceiling_hit_count} places (marked above the waveform).`
      : 'The limiter never had to reach the ceiling.';
  } catch {
    $('.waveform', node).dataset.drawn = 'failed';
  }
}

// ---- A/B comparison of two finished mixes ----

function pickForCompare(jobId, picked) {
  page.compare = page.compare.filter((id) => id !== jobId);
  if (picked) page.compare.push(jobId);
  // At most two: the oldest pick makes room.
  while (page.compare.length > 2) {
    const dropped = page.compare.shift();
    const node = page.jobs.get(dropped)?.node;
    if (node) $('.compare-pick', node).checked = false;
  }
  renderCompare();
}

function renderCompare() {
  const panel = $('#compare');
  const picked = page.compare.map((id) => page.jobs.get(id)?.status).filter(Boolean);
  panel.hidden = picked.length !== 2;
  if (picked.length !== 2) return;
  const players = [$('#compare-a'), $('#compare-b')];
  picked.forEach((status, i) => {
    if (players[i].getAttribute('src') !== playable(status)) players[i].src = playable(status);
    $(`#compare-report-${i ? 'b' : 'a'}`).replaceChildren(...reportRows(status.report));
    $(`#compare-name-${i ? 'b' : 'a'}`).textContent = `${i ? 'B' : 'A'}: mix of ${new Date(status.created_at).toLocaleTimeString()}`;
  });
}

/** Switches playback to the other mix at the same position. */
function switchCompare() {
  const [a, b] = [$('#compare-a'), $('#compare-b')];
  const [from, to] = $('#compare').dataset.playing === 'b' ? [b, a] : [a, b];
  to.currentTime = from.currentTime;
  const wasPlaying = !from.paused;
  from.pause();
  if (wasPlaying) to.play().catch(() => {});
  $('#compare').dataset.playing = to === a ? 'a' : 'b';
  $('#compare-switch').textContent = `Switch to ${to === a ? 'B' : 'A'}`;
  announce(`Playing ${to === a ? 'A' : 'B'}`);
}

// ---- live ----

function connectLive() {
  if (page.live || !page.project || (page.stems.length === 0 && page.jobs.size === 0)) return;
  const project = page.project;
  let ticks = 0;
  page.live = new LiveFeed({
    sse: `/mix/${project}/mix/events`,
    ws: `/mix/${project}/mix/ws`,
    // The legacy status route, once per second for every unfinished job; the job list now and
    // then, to see jobs started elsewhere.
    poll: async () => {
      if (ticks++ % 5 === 0) await loadJobs();
      const live = [...page.jobs.values()].filter(({ status }) => !isFinished(status));
      const answers = await Promise.all(live.map(({ status }) => api('GET', `/projects/${project}/mix/status?job_id=${status.job_id}`)));
      if (answers.some((a) => a.error === 'NETWORK')) throw new Error('the server cannot be reached');
      return answers.filter((a) => a.ok).map((a) => a.data);
    },
    onStatus: upsertJob,
    onReconnect: () => loadJobs(),
    onTransport: (name) => { $('#transport').textContent = name; },
  });
  page.live.start();
}

// ---- overview of every project ----

function renderOverview(status) {
  let row = page.overview.get(status.job_id);
  if (!row) {
    row = document.createElement('li');
    row.innerHTML = '<a></a><span></span><progress max="100"></progress><span></span>';
    $('#overview').prepend(row);
    page.overview.set(status.job_id, row);
  }
  const [link, state, bar, percent] = row.children;
  link.textContent = status.project_id;
  link.href = `#${status.project_id}`;
  state.textContent = STAGE_LABELS[status.state];
  row.dataset.state = status.state;
  bar.value = status.progress;
  bar.setAttribute('aria-label', `${status.project_id} progress`);
  percent.textContent = `${status.progress}%`;
  clearTimeout(row.expiry);
  if (status.project_id === page.project) {
    upsertJob(status);
    // A job started elsewhere on the open project, before it had stems here: follow it now.
    if (!page.live) loadStems().then(connectLive);
  }
  if (isFinished(status)) {
    // Finished while one looked away: it stays a while, marked, instead of vanishing.
    row.expiry = setTimeout(() => { row.remove(); page.overview.delete(status.job_id); renderOverviewEmpty(); }, OVERVIEW_KEEP_MS);
    loadProjects();
  }
  renderOverviewEmpty();
}

function renderOverviewEmpty() {
  $('#overview-empty').hidden = page.overview.size > 0;
}

// ---- access ----

function showSignIn(message = '') {
  page.live?.stop();
  page.live = null;
  $('#sign-in').hidden = false;
  $('#workspace').hidden = true;
  $('#identity').hidden = true;
  $('#sign-in-error').textContent = message;
  $('#credential').focus();
}

function describe(identity) {
  if (identity.kind === 'admin') return 'administrator';
  const who = identity.subject ? `${identity.subject}, ` : '';
  return `${who}${identity.scope} access to ${identity.project_id}`;
}

/// Who this browser is: an open server, an admin, or a token for one project; null when the
/// server wants a credential first.
async function whoAmI() {
  const answer = await api('GET', '/session');
  if (answer.status === 401) return null;
  return answer.ok ? answer.data : { kind: 'open' };
}

async function signIn(event) {
  event.preventDefault();
  const answer = await api('POST', '/session', { body: JSON.stringify({ token: $('#credential').value.trim() }), headers: { 'content-type': 'application/json' } });
  $('#credential').value = '';
  if (!answer.ok) {
    $('#sign-in-error').textContent = answer.status === 401 ? 'That token or key is not valid (or has expired).' : explain(answer);
    return;
  }
  location.reload();
}

async function signOut() {
  await api('DELETE', '/session');
  location.reload();
}

function wire() {
  whenUnauthorized(showSignIn);
  $('#project-form').addEventListener('submit', (event) => {
    event.preventDefault();
    const id = $('#project-id').value.trim();
    if ($('#project-id').checkValidity()) openProject(id);
  });
  $('#project-search').addEventListener('input', renderProjects);
  $('#mix-form').addEventListener('submit', startMix);
  $('#reference').addEventListener('change', referenceChanged);
  // A double click's second click can come after the first one's answer, when the button is
  // enabled again and the key spent: the browser counts it (detail 2), and it starts nothing.
  // Two separate clicks start two mixes.
  $('#start-mix').addEventListener('click', (event) => {
    if (event.detail > 1) event.preventDefault();
  });
  $('#compare-switch').addEventListener('click', switchCompare);
  $('#file-input').addEventListener('change', (event) => { uploadFiles(event.target.files); event.target.value = ''; });
  const zone = $('#drop-zone');
  zone.addEventListener('keydown', (event) => {
    if (event.key === 'Enter' || event.key === ' ') { event.preventDefault(); $('#file-input').click(); }
  });
  for (const type of ['dragenter', 'dragover']) zone.addEventListener(type, (event) => { event.preventDefault(); zone.classList.add('over'); });
  for (const type of ['dragleave', 'drop']) zone.addEventListener(type, () => zone.classList.remove('over'));
  zone.addEventListener('drop', (event) => { event.preventDefault(); uploadFiles(event.dataTransfer.files); });
  window.addEventListener('hashchange', () => {
    const id = decodeURIComponent(location.hash.slice(1));
    if (id && id !== page.project) openProject(id);
  });
  setInterval(() => {
    for (const { node, status } of page.jobs.values()) if (!isFinished(status)) updateElapsed(node, status);
  }, 1000);
  $('#sign-in-form').addEventListener('submit', signIn);
  $('#sign-out').addEventListener('click', signOut);
}

async function start() {
  wire();
  let known;
  page.opened = new Promise((resolve) => { known = resolve; });
  const identity = await whoAmI();
  if (!identity) {
    known();
    return showSignIn();
  }
  if (identity.kind !== 'open') {
    $('#identity-name').textContent = describe(identity);
    $('#identity').hidden = false;
  }
  // Every project's live overview is for administrators (and open servers) only.
  if (identity.kind !== 'token') {
    // No polling route lists every project's live jobs: without a stream the panel says so.
    const onTransport = (name) => { $('#overview-transport').textContent = name; };
    new LiveFeed({ sse: '/events', ws: '/ws', poll: null, onStatus: renderOverview, onReconnect: loadProjects, onTransport }).start();
  } else {
    $('#overview-panel').hidden = true;
  }
  const initial = identity.kind === 'token' ? identity.project_id : decodeURIComponent(location.hash.slice(1));
  if (initial) openProject(initial);
  known();
  await loadProjects();
}

start();
