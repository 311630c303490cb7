// The mixd dashboard. It speaks only the public contract (shared/CONTRACT.md): the envelope
// routes, the live streams (EventSource, then WebSocket, then polling the legacy status route),
// and /media for results.

const STAGES = ['queued', 'running', 'loading_stems', 'aligning_stems', 'processing_tracks', 'mixing', 'mastering', 'exporting', 'complete'];
const STAGE_LABELS = {
  queued: 'Queued', running: 'Starting', loading_stems: 'Loading', aligning_stems: 'Aligning',
  processing_tracks: 'Processing', mixing: 'Mixing', mastering: 'Mastering', exporting: 'Exporting',
  complete: 'Done', error: 'Failed',
};
// Error codes in words a musician understands.
const FRIENDLY = {
  UNSUPPORTED_AUDIO: "This file isn't audio we can read.",
  PAYLOAD_TOO_LARGE: 'This file is bigger than the server accepts.',
  INSUFFICIENT_STORAGE: 'The server is out of disk space. Try again later.',
  NO_FILES: 'Choose at least one audio file.',
  TOO_MANY_FILES: 'Too many files at once: add them in smaller batches.',
  DECODE_FAILED: 'One of the stems is damaged and could not be read.',
  STEM_MISSING: 'A stem was removed before the mix could use it.',
  NO_STEMS: 'Add some stems before mixing.',
  PROJECT_NOT_FOUND: 'Add some stems before mixing.',
  INVALID_SETTINGS: 'Some mix settings are out of range.',
  OUTPUT_TOO_LONG: 'The mix is too long to fit in one WAV file.',
  CANCELED: 'You canceled this mix.',
  INTERRUPTED: 'The server restarted during this mix too many times.',
  INTERNAL: 'Something went wrong on our side. Please try again.',
  EXPORT_FAILED: 'The finished mix could not be saved.',
};
const POLL_MS = 1000;

const $ = (selector, root = document) => root.querySelector(selector);

const page = {
  project: null,
  stems: [],
  tracks: {},
  jobs: new Map(),
  live: null,
  pendingStartKey: null,
};

function explain(envelope) {
  const friendly = FRIENDLY[envelope.error];
  const detail = envelope.message && envelope.message !== friendly ? ` (${envelope.message})` : '';
  return friendly ? friendly + detail : envelope.message || 'Something went wrong.';
}

async function api(method, path, { body, headers } = {}) {
  let response;
  try {
    response = await fetch(path, { method, body, headers });
  } catch {
    return { ok: false, error: 'NETWORK', message: 'The server cannot be reached. Check your connection.' };
  }
  // The session's token expired (or was revoked): ask for a credential again.
  if (response.status === 401 && path !== '/session') showSignIn('Your session has ended: sign in again.');
  try {
    return { status: response.status, ...(await response.json()) };
  } catch {
    return { ok: false, status: response.status, error: 'INTERNAL', message: `Unexpected answer (${response.status}).` };
  }
}

// ---- project ----

function rememberProject(id) {
  const recent = JSON.parse(localStorage.getItem('mixd.projects') || '[]').filter((p) => p && p !== id);
  if (id) recent.unshift(id);
  localStorage.setItem('mixd.projects', JSON.stringify(recent.slice(0, 12)));
  $('#recent-projects').replaceChildren(...recent.map((p) => Object.assign(document.createElement('option'), { value: p })));
}

async function openProject(id) {
  page.live?.stop();
  page.live = null;
  page.project = id;
  page.jobs.clear();
  page.tracks = JSON.parse(localStorage.getItem(`mixd.tracks.${id}`) || '{}');
  $('#jobs').replaceChildren();
  $('#uploads').replaceChildren();
  $('#mix-error').textContent = '';
  $('#project-id').value = id;
  $('#workspace').hidden = false;
  rememberProject(id);
  if (location.hash !== `#${id}`) history.replaceState(null, '', `#${id}`);
  await Promise.all([loadStems(), loadJobs()]);
  connectLive();
}

async function loadStems() {
  const answer = await api('GET', `/projects/${page.project}/stems`);
  page.stems = answer.ok ? answer.data.stems : [];
  renderStems();
}

async function loadJobs() {
  const answer = await api('GET', `/mix/${page.project}/mix/jobs`);
  if (!answer.ok) return;
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
      <td><input type="range" min="-1" max="1" step="0.05" aria-label="Pan"></td>
      <td><input type="checkbox" aria-label="Mute"></td>
      <td><input type="checkbox" aria-label="Solo"></td>
      <td><button type="button" aria-label="Remove">✕</button></td>`;
    const name = $('.stem-name', row);
    name.textContent = stem.name;
    name.title = stem.name;
    const [gain, pan, mute, solo] = row.querySelectorAll('input');
    gain.value = track.gain_db;
    pan.value = track.pan;
    mute.checked = track.mute;
    solo.checked = track.solo;
    for (const input of [gain, pan, mute, solo]) input.setAttribute('aria-label', `${input.getAttribute('aria-label')} of ${stem.name}`);
    gain.addEventListener('change', () => { track.gain_db = Number(gain.value); saveTracks(); });
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
      if (!answer.ok) return fail(explain(answer));
      item.className = 'done';
      item.replaceChildren(`${file.name}: added`);
      resolve(true);
    });
    xhr.addEventListener('error', () => fail('the upload was interrupted. Check your connection and try again.'));
    xhr.send(form);
  });
}

async function uploadFiles(files) {
  if (!page.project || files.length === 0) return;
  const results = await Promise.all([...files].map(uploadFile));
  if (results.some(Boolean)) {
    await loadStems();
    connectLive();
  }
}

// ---- mixing ----

function mixSettings() {
  const tracks = {};
  for (const stem of page.stems) tracks[stem.stem_id] = trackOf(stem);
  return {
    tracks,
    master: { target_lufs: Number($('#target-lufs').value), true_peak_dbtp: Number($('#true-peak').value) },
    output: { bit_depth: Number($('#bit-depth').value) },
  };
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
}

function upsertJob(status) {
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
    $('#jobs').prepend(node);
  }
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
  $('.cancel', node).hidden = status.state === 'complete' || status.state === 'error';
  updateElapsed(node, status);
  if (status.state === 'complete' && $('.result', node).hidden) showResult(node, status);
}

function updateElapsed(node, status) {
  const end = status.state === 'complete' || status.state === 'error' ? Date.parse(status.updated_at) : Date.now();
  const seconds = Math.max(0, (end - Date.parse(status.created_at)) / 1000);
  $('.job-time', node).textContent = `${seconds.toFixed(0)} s`;
}

function showResult(node, status) {
  const result = $('.result', node);
  result.hidden = false;
  $('.player', node).src = status.result_url;
  const download = $('.download', node);
  download.href = status.result_url;
  download.download = `${status.project_id}-${status.job_id.slice(0, 8)}.wav`;
  const report = status.report ?? {};
  const number = (value, unit, digits = 1) => (value === null || value === undefined ? '–' : `${value.toFixed(digits)} ${unit}`);
  const rows = [
    ['Loudness', number(report.integrated_lufs, 'LUFS')],
    ['True peak', number(report.true_peak_dbtp, 'dBTP')],
    ['Loudness range', number(report.loudness_range_lu, 'LU')],
    ['Length', report.duration_s !== undefined ? formatDuration(report.duration_s) : '–'],
    ['Format', `${(report.sample_rate / 1000).toFixed(1)} kHz · ${report.bit_depth}-bit`],
  ];
  $('.report', node).replaceChildren(...rows.map(([term, value]) => {
    const div = document.createElement('div');
    div.append(Object.assign(document.createElement('dt'), { textContent: term }), Object.assign(document.createElement('dd'), { textContent: value }));
    return div;
  }));
  drawWaveform($('.waveform', node), status.result_url);
}

// Peaks are computed here from the WAV itself: the browser already downloads the file to play it.
async function drawWaveform(canvas, url) {
  try {
    const buffer = await (await fetch(url)).arrayBuffer();
    const peaks = wavPeaks(new DataView(buffer), canvas.width);
    const context = canvas.getContext('2d');
    const middle = canvas.height / 2;
    context.clearRect(0, 0, canvas.width, canvas.height);
    context.fillStyle = getComputedStyle(document.documentElement).getPropertyValue('--accent') || '#5fb3ff';
    peaks.forEach(([low, high], x) => {
      const top = middle - high * middle;
      context.fillRect(x, top, 1, Math.max(1, (high - low) * middle));
    });
    canvas.dataset.drawn = 'true';
  } catch (error) {
    canvas.dataset.drawn = 'failed';
  }
}

function wavPeaks(view, columns) {
  let offset = 12;
  let format = null;
  while (offset + 8 <= view.byteLength) {
    const id = String.fromCharCode(...[0, 1, 2, 3].map((i) => view.getUint8(offset + i)));
    const size = view.getUint32(offset + 4, true);
    if (id === 'fmt ') {
      format = { tag: view.getUint16(offset + 8, true), channels: view.getUint16(offset + 10, true), bits: view.getUint16(offset + 22, true) };
    } else if (id === 'data' && format) {
      return peaksOf(view, offset + 8, Math.min(size, view.byteLength - offset - 8), format, columns);
    }
    offset += 8 + size + (size % 2);
  }
  throw new Error('not a WAV file');
}

function peaksOf(view, start, length, { tag, channels, bits }, columns) {
  const bytes = bits / 8;
  const frames = Math.floor(length / (bytes * channels));
  const float = tag === 3 || (tag === 0xfffe && bits === 32);
  const read = (at) => {
    if (float) return view.getFloat32(at, true);
    if (bits === 16) return view.getInt16(at, true) / 32768;
    if (bits === 24) return ((view.getUint8(at) | (view.getUint8(at + 1) << 8) | (view.getInt8(at + 2) << 16))) / 8388608;
    return view.getInt32(at, true) / 2147483648;
  };
  const peaks = [];
  const perColumn = Math.max(1, Math.floor(frames / columns));
  // At most ~2000 samples per column: plenty to find the peaks a 1-pixel column shows.
  const stride = Math.max(1, Math.floor(perColumn / 2000));
  for (let column = 0; column < columns; column++) {
    let low = 0, high = 0;
    const first = column * perColumn;
    for (let frame = first; frame < Math.min(frames, first + perColumn); frame += stride) {
      const value = read(start + frame * bytes * channels);
      if (value < low) low = value;
      if (value > high) high = value;
    }
    peaks.push([low, high]);
  }
  return peaks;
}

// ---- live updates: EventSource, else WebSocket, else polling ----

class LiveFeed {
  constructor({ sse, ws, poll, onStatus, onTransport }) {
    Object.assign(this, { sse, ws, poll, onStatus, onTransport });
    this.stopped = false;
    this.retry = 1000;
  }

  start() {
    if (this.sse && 'EventSource' in window) this.startSse();
    else this.startWebSocket();
  }

  stop() {
    this.stopped = true;
    this.source?.close();
    this.socket?.close();
    clearInterval(this.timer);
  }

  startSse() {
    let opened = false;
    this.source = new EventSource(this.sse);
    this.source.addEventListener('open', () => { opened = true; this.onTransport('Server-Sent Events'); });
    this.source.addEventListener('status', (event) => this.onStatus(JSON.parse(event.data)));
    this.source.addEventListener('error', () => {
      if (this.stopped) return;
      if (!opened || this.source.readyState === EventSource.CLOSED) {
        // EventSource does not work here (a proxy, an old browser): try the next transport.
        this.source.close();
        this.startWebSocket();
      } else {
        this.onTransport('Server-Sent Events (reconnecting…)');
      }
    });
  }

  startWebSocket() {
    if (!this.ws || !('WebSocket' in window)) return this.startPolling();
    let opened = false;
    const url = new URL(this.ws, location.href);
    url.protocol = url.protocol === 'https:' ? 'wss:' : 'ws:';
    this.socket = new WebSocket(url);
    this.socket.addEventListener('open', () => { opened = true; this.retry = 1000; this.onTransport('WebSocket'); });
    this.socket.addEventListener('message', (event) => {
      const frame = JSON.parse(event.data);
      if (frame.type === 'status') this.onStatus(frame.data);
    });
    this.socket.addEventListener('close', () => {
      if (this.stopped) return;
      if (!opened) return this.startPolling();
      this.onTransport('WebSocket (reconnecting…)');
      setTimeout(() => !this.stopped && this.startWebSocket(), this.retry);
      this.retry = Math.min(this.retry * 2, 10000);
    });
  }

  startPolling() {
    if (!this.poll) return this.onTransport('not available');
    this.onTransport('polling every second');
    const tick = async () => { for (const status of await this.poll()) this.onStatus(status); };
    tick();
    this.timer = setInterval(tick, POLL_MS);
  }
}

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
      const live = [...page.jobs.values()].filter(({ status }) => !['complete', 'error'].includes(status.state));
      const answers = await Promise.all(live.map(({ status }) => api('GET', `/projects/${project}/mix/status?job_id=${status.job_id}`)));
      return answers.filter((a) => a.ok).map((a) => a.data);
    },
    onStatus: (status) => status.project_id === page.project && upsertJob(status),
    onTransport: (name) => { $('#transport').textContent = name; },
  });
  page.live.start();
}

// ---- overview of every project ----

const overview = new Map();

function renderOverview(status) {
  let row = overview.get(status.job_id);
  if (status.state === 'complete' || status.state === 'error') {
    row?.remove();
    overview.delete(status.job_id);
  } else {
    if (!row) {
      row = document.createElement('li');
      row.innerHTML = '<a></a><span></span><progress max="100"></progress><span></span>';
      $('#overview').append(row);
      overview.set(status.job_id, row);
    }
    const [link, state, bar, percent] = row.children;
    link.textContent = status.project_id;
    link.href = `#${status.project_id}`;
    state.textContent = STAGE_LABELS[status.state];
    bar.value = status.progress;
    bar.setAttribute('aria-label', `${status.project_id} progress`);
    percent.textContent = `${status.progress}%`;
  }
  $('#overview-empty').hidden = overview.size > 0;
}

// ---- wiring ----

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
  $('#project-form').addEventListener('submit', (event) => {
    event.preventDefault();
    const id = $('#project-id').value.trim();
    if ($('#project-id').checkValidity()) openProject(id);
  });
  $('#mix-form').addEventListener('submit', startMix);
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
    for (const { node, status } of page.jobs.values()) if (!['complete', 'error'].includes(status.state)) updateElapsed(node, status);
  }, 1000);
  $('#sign-in-form').addEventListener('submit', signIn);
  $('#sign-out').addEventListener('click', signOut);
}

async function start() {
  wire();
  const identity = await whoAmI();
  if (!identity) return showSignIn();
  if (identity.kind !== 'open') {
    $('#identity-name').textContent = describe(identity);
    $('#identity').hidden = false;
  }
  // Every project's live overview is for administrators (and open servers) only.
  if (identity.kind !== 'token') new LiveFeed({ sse: '/events', ws: '/ws', poll: null, onStatus: renderOverview, onTransport: () => {} }).start();
  rememberProject(null);
  const initial = identity.kind === 'token' ? identity.project_id : decodeURIComponent(location.hash.slice(1));
  if (initial) openProject(initial);
}

start();
