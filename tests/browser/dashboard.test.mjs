// The dashboard in Debian's Chromium, driven by playwright-core, against a real mixd on port 0.
// Run by scripts/test after `cargo test` has built target/debug/mixd.

import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync, spawn } from 'node:child_process';
import { mkdirSync, mkdtempSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import http from 'node:http';
import net from 'node:net';
import { chromium } from 'playwright-core';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const binary = process.env.MIXD_BIN ?? path.join(root, 'target/debug/mixd');
const artifacts = path.join(root, 'artifacts');
const DEADLINE_MS = 120_000;
const STATES = ['queued', 'running', 'loading_stems', 'aligning_stems', 'processing_tracks', 'mixing', 'mastering', 'exporting', 'complete'];

let server;
let context;
let stems;
let notAudio;

function startServer(extraArgs = [], { data = mkdtempSync(path.join(tmpdir(), 'mixd-browser-data-')), addr = '127.0.0.1:0' } = {}) {
  // One mixer slot unless the test asks for another number.
  const slots = extraArgs.includes('--mix-slots') ? [] : ['--mix-slots', '1'];
  const child = spawn(binary, ['serve', '--addr', addr, '--data-dir', data, '--log-format', 'json', ...slots, ...extraArgs], {
    stdio: ['ignore', 'ignore', 'pipe'],
  });
  return new Promise((resolve, reject) => {
    let pending = '';
    child.stderr.on('data', (chunk) => {
      pending += chunk;
      const lines = pending.split('\n');
      pending = lines.pop();
      for (const line of lines) {
        try {
          const address = JSON.parse(line).fields?.address;
          if (address) resolve({ child, base: `http://${address}`, address, data });
        } catch { /* not a JSON log line */ }
      }
    });
    child.on('exit', (code) => reject(new Error(`mixd exited with ${code} before listening`)));
  });
}

function makeStems() {
  const dir = mkdtempSync(path.join(tmpdir(), 'mixd-browser-stems-'));
  const make = (name, source) => {
    const file = path.join(dir, name);
    execFileSync('ffmpeg', ['-nostdin', '-loglevel', 'error', '-y', '-f', 'lavfi', '-i', source, file]);
    return file;
  };
  stems = [
    make('drums.wav', 'aevalsrc=0.8*sin(2*PI*70*t)*exp(-12*mod(t\\,0.5)):s=44100:d=8'),
    make('bass.flac', 'sine=f=55:r=48000:d=8'),
    make('pad.wav', 'anoisesrc=c=pink:a=0.1:r=48000:d=8'),
  ];
  notAudio = path.join(dir, 'lyrics.wav');
  writeFileSync(notAudio, 'Verse one, chorus, verse two.');
}

before(async () => {
  makeStems();
  server = await startServer();
  context = await chromium.launchPersistentContext(mkdtempSync(path.join(tmpdir(), 'mixd-chromium-')), {
    executablePath: '/usr/bin/chromium',
    headless: true,
    viewport: { width: 1280, height: 800 },
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  });
});

after(async () => {
  await context?.close();
  server?.child.kill('SIGTERM');
});

/** Records every state and progress value each job card shows, as the page changes them. */
function recordJobCards() {
  window.__jobLog = [];
  new MutationObserver((records) => {
    for (const record of records) {
      const card = record.target.closest?.('.job');
      if (!card || !card.dataset.jobId) continue;
      window.__jobLog.push({ job: card.dataset.jobId, state: card.dataset.state, progress: Number(card.querySelector('.job-progress').value) });
    }
  }).observe(document, { subtree: true, attributes: true, attributeFilter: ['data-state', 'value'] });
}

async function mixThroughThePage({ project, hide, transport, screenshot }) {
  const page = await context.newPage();
  if (hide.includes('EventSource')) await page.addInitScript(() => { delete window.EventSource; });
  if (hide.includes('WebSocket')) await page.addInitScript(() => { delete window.WebSocket; });
  await page.addInitScript(recordJobCards);
  await page.goto(`${server.base}/#${project}`);

  await page.setInputFiles('#file-input', stems);
  await page.waitForFunction((n) => document.querySelectorAll('#stems-table tbody tr').length === n, stems.length, { timeout: DEADLINE_MS });
  await page.fill('#target-lufs', '-16');
  // A double click starts one mix.
  await page.dblclick('#start-mix');
  await page.waitForSelector('.job[data-state=complete]', { timeout: DEADLINE_MS });
  assert.equal(await page.locator('.job').count(), 1, 'one job for a double click');
  assert.match(await page.textContent('#transport'), transport);
  // The overview has no polling: with neither stream it says so instead of staying silent.
  assert.match(await page.textContent('#overview-transport'), hide.includes('WebSocket') ? /^not available$/ : transport);

  const log = await page.evaluate(() => window.__jobLog);
  assert.ok(log.length > 0);
  let previous = { progress: 0, state: 'queued' };
  for (const entry of log) {
    assert.ok(entry.progress >= previous.progress, `progress went back: ${JSON.stringify(previous)} -> ${JSON.stringify(entry)}`);
    assert.ok(STATES.indexOf(entry.state) >= STATES.indexOf(previous.state), `state went back: ${previous.state} -> ${entry.state}`);
    previous = entry;
  }
  assert.equal(previous.state, 'complete');
  assert.equal(previous.progress, 100);
  const seenStates = new Set(log.map((e) => e.state));
  assert.ok(seenStates.size >= 2, `saw states ${[...seenStates]}`);
  assert.equal(await page.locator('.job[data-state=complete] .timeline li.done').count(), 6, 'every stage marked done');

  const duration = await page.waitForFunction(() => {
    const audio = document.querySelector('.job[data-state=complete] audio');
    return audio && audio.readyState >= 1 && audio.duration > 0 && audio.duration;
  }, null, { timeout: DEADLINE_MS });
  assert.ok(Math.abs((await duration.jsonValue()) - 8) < 0.2, 'the player loaded the 8 s mix');
  await page.waitForFunction(() => document.querySelector('.job[data-state=complete] canvas.waveform')?.dataset.drawn === 'true', null, { timeout: DEADLINE_MS });
  const litPixels = await page.evaluate(() => {
    const canvas = document.querySelector('.job[data-state=complete] canvas.waveform');
    const pixels = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
    let lit = 0;
    for (let i = 3; i < pixels.length; i += 4) if (pixels[i] > 0) lit += 1;
    return lit;
  });
  assert.ok(litPixels > 5000, `the waveform is drawn (${litPixels} pixels)`);
  const loudness = await page.textContent('.job[data-state=complete] .report');
  assert.match(loudness, /-1[56]\.\d LUFS/);
  // The player streams the small Opus file; the menu offers every file, with its size.
  const src = await page.getAttribute('.job[data-state=complete] audio', 'src');
  assert.match(src, /\/final_mix\.opus$/);
  assert.match(await page.getAttribute('.job[data-state=complete] a.download', 'href'), /\/final_mix\.wav$/);
  const files = await page.$$eval('.job[data-state=complete] .downloads li', (items) => items.map((item) => item.textContent));
  assert.equal(files.length, 2, `${files}`);
  assert.match(files[0], /^WAV \d+(\.\d)? (MB|kB) · -1[56]\.\d LUFS · -\d+\.\d dBTP$/);
  assert.match(files[1], /^OPUS \d+ kB · -1[56]\.\d LUFS · -\d+\.\d dBTP$/);

  if (screenshot) {
    mkdirSync(artifacts, { recursive: true });
    await page.screenshot({ path: path.join(artifacts, screenshot), fullPage: true });
  }
  return page;
}

test('a mix completes live over EventSource, with player, waveform and report', async () => {
  const page = await mixThroughThePage({ project: 'browser-sse', hide: [], transport: /Server-Sent Events/, screenshot: 'dashboard.png' });
  // A refused file is explained in words, and the page keeps working.
  await page.setInputFiles('#file-input', [notAudio]);
  await page.waitForSelector('#uploads li.failed', { timeout: DEADLINE_MS });
  assert.match(await page.textContent('#uploads li.failed'), /lyrics\.wav: This file isn't audio we can read/);
  // The same page on a phone: nothing wider than the screen.
  await page.setViewportSize({ width: 360, height: 740 });
  const overflow = await page.evaluate(() => document.documentElement.scrollWidth - document.documentElement.clientWidth);
  assert.ok(overflow <= 1, `the page is ${overflow}px wider than a phone`);
  await page.screenshot({ path: path.join(artifacts, 'dashboard-phone.png'), fullPage: true });
  await page.close();
});

test('without EventSource the same job completes live over the WebSocket', async () => {
  const page = await mixThroughThePage({ project: 'browser-ws', hide: ['EventSource'], transport: /WebSocket/ });
  await page.close();
});

test('without EventSource and WebSocket it completes over polling', async () => {
  const page = await mixThroughThePage({ project: 'browser-poll', hide: ['EventSource', 'WebSocket'], transport: /polling/ });
  await page.close();
});

test('a start past the project\'s queue and an upload past its quota say why and when to try again', async () => {
  // Room for the three stems and no more; one mix may wait, and none runs.
  const quotaGb = (stems.reduce((sum, file) => sum + statSync(file).size, 0) * 1.01) / 1e9;
  const limited = await startServer(['--mix-slots', '0', '--max-queued-per-project', '1', '--project-quota-gb', String(quotaGb)]);
  try {
    const page = await context.newPage();
    await page.goto(`${limited.base}/#browser-limits`);
    await page.setInputFiles('#file-input', stems);
    await page.waitForFunction(() => document.querySelectorAll('#stems-table tbody tr').length === 3, null, { timeout: DEADLINE_MS });
    await page.setInputFiles('#file-input', stems[0]);
    await page.waitForSelector('#uploads li.failed', { timeout: DEADLINE_MS });
    assert.match(await page.textContent('#uploads li.failed'), /^drums\.wav: This project's stems would take more space than the server allows: delete some stems to make room\./);
    await page.click('#start-mix');
    await page.waitForSelector('.job[data-state=queued]', { timeout: DEADLINE_MS });
    await page.waitForFunction(() => !document.querySelector('#start-mix').disabled);
    await page.click('#start-mix');
    await page.waitForFunction(() => document.querySelector('#mix-error').textContent !== '', null, { timeout: DEADLINE_MS });
    assert.match(await page.textContent('#mix-error'), /^Too many mixes are waiting in this project\. \(.*\) Try again in 30 seconds\.$/);
    assert.equal(await page.locator('.job').count(), 1, 'the refused start made no job');
    await page.close();
  } finally {
    limited.child.kill('SIGTERM');
  }
});

test('a queued job can be canceled from the page', async () => {
  // No mixer slot: both jobs stay queued whatever the engine's speed, so the one canceled is
  // certainly still waiting when the button is pressed.
  const idle = await startServer(['--mix-slots', '0']);
  try {
    const page = await context.newPage();
    await page.goto(`${idle.base}/#browser-cancel`);
    await page.setInputFiles('#file-input', stems);
    await page.waitForFunction(() => document.querySelectorAll('#stems-table tbody tr').length === 3, null, { timeout: DEADLINE_MS });
    await page.click('#start-mix');
    await page.waitForSelector('.job', { timeout: DEADLINE_MS });
    await page.waitForFunction(() => !document.querySelector('#start-mix').disabled);
    await page.click('#start-mix');
    await page.waitForFunction(() => document.querySelectorAll('.job[data-state=queued]').length === 2, null, { timeout: DEADLINE_MS });
    const [older, newer] = [page.locator('.job').nth(1), page.locator('.job').first()];
    const olderId = await older.getAttribute('data-job-id');
    await newer.locator('.cancel').click();
    await page.waitForSelector('.job[data-state=error]', { timeout: DEADLINE_MS });
    assert.match(await newer.locator('.job-message').textContent(), /You canceled this mix/);
    assert.equal(await newer.locator('.cancel').isHidden(), true, 'a canceled job offers no cancel');
    // The other job is untouched, and first in the queue.
    const other = page.locator(`.job[data-job-id="${olderId}"]`);
    assert.equal(await other.getAttribute('data-state'), 'queued');
    await page.waitForFunction((id) => /position 1\)/.test(document.querySelector(`.job[data-job-id="${id}"] .job-message`).textContent), olderId, { timeout: DEADLINE_MS });
    await page.close();
  } finally {
    idle.child.kill('SIGTERM');
  }
});

test('with keys configured the page asks for a credential, shows who is signed in, and signs out', async () => {
  const tokenKey = 'k1=browser-test-token-secret-0123456789abcdef';
  const secured = await startServer(['--api-key', 'browser-test-admin-key-0123456789abcdef', '--token-key', tokenKey]);
  try {
    const token = execFileSync(binary, ['token', '--project', 'signed-in', '--scope', 'write', '--ttl', '10m', '--subject', 'ada', '--token-key', tokenKey]).toString().trim();
    const page = await context.newPage();
    await page.goto(`${secured.base}/`);
    await page.waitForSelector('#sign-in:not([hidden])');
    assert.equal(await page.isVisible('#workspace'), false);
    mkdirSync(artifacts, { recursive: true });
    await page.screenshot({ path: path.join(artifacts, 'sign-in.png') });
    await page.fill('#credential', 'not-a-token');
    await page.click('#sign-in-form button[type=submit]');
    await page.waitForFunction(() => document.querySelector('#sign-in-error').textContent.includes('not valid'));
    await page.fill('#credential', token);
    await page.click('#sign-in-form button[type=submit]');
    await page.waitForSelector('#identity:not([hidden])', { timeout: DEADLINE_MS });
    assert.equal(await page.textContent('#identity-name'), 'ada, write access to signed-in');
    // The token's project opens, and its stems upload with the cookie alone.
    await page.waitForFunction(() => document.querySelector('#project-id').value === 'signed-in');
    await page.setInputFiles('#file-input', stems.slice(0, 1));
    await page.waitForFunction(() => document.querySelectorAll('#stems-table tbody tr').length === 1, null, { timeout: DEADLINE_MS });
    const cookies = await context.cookies(secured.base);
    const session = cookies.find((c) => c.name === 'mixd_token');
    assert.ok(session?.httpOnly && session.sameSite === 'Strict', 'an HttpOnly, SameSite=Strict cookie');
    assert.equal(await page.evaluate(() => document.cookie.includes('mixd_token')), false, 'scripts cannot read it');
    await page.click('#sign-out');
    await page.waitForSelector('#sign-in:not([hidden])', { timeout: DEADLINE_MS });
    await page.close();
  } finally {
    secured.child.kill('SIGTERM');
  }
});

test('a page on another port of the same host cannot use the signed-in cookie to start a mix', async () => {
  const adminKey = 'browser-test-admin-key-0123456789abcdef';
  const tokenKey = 'k1=browser-test-token-secret-0123456789abcdef';
  const secured = await startServer(['--api-key', adminKey, '--token-key', tokenKey]);
  // Another server on the same host: a same-site page, to which Chromium attaches the server's
  // SameSite=Strict cookie.
  const elsewhere = http.createServer((request, response) => {
    response.writeHead(200, { 'content-type': 'text/html' });
    response.end('<!doctype html><title>elsewhere</title>');
  });
  await new Promise((resolve) => elsewhere.listen(0, '127.0.0.1', resolve));
  try {
    const admin = { authorization: `Bearer ${adminKey}` };
    const form = new FormData();
    form.append('file', new Blob([readFileSync(stems[0])]), path.basename(stems[0]));
    assert.equal((await fetch(`${secured.base}/projects/csrf/stems`, { method: 'POST', body: form, headers: admin })).status, 201);
    const jobs = async () => (await (await fetch(`${secured.base}/mix/csrf/mix/jobs`, { headers: admin })).json()).data.jobs.length;
    const token = execFileSync(binary, ['token', '--project', 'csrf', '--scope', 'write', '--ttl', '10m', '--token-key', tokenKey]).toString().trim();
    const page = await context.newPage();
    await page.goto(`${secured.base}/`);
    const signedIn = await page.evaluate(async (token) => (await fetch('/session', { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ token }) })).status, token);
    assert.equal(signedIn, 200);

    // The forgery: simple requests (no preflight) with the cookie, from the other page.
    await page.goto(`http://127.0.0.1:${elsewhere.address().port}/`);
    const sent = await page.evaluate(async (base) => {
      const outcomes = [];
      for (const type of ['text/plain', 'application/x-www-form-urlencoded']) {
        try {
          await fetch(`${base}/mix/csrf/mix/start`, { method: 'POST', mode: 'no-cors', credentials: 'include', headers: { 'content-type': type }, body: '{}' });
          outcomes.push('sent');
        } catch (error) {
          outcomes.push(String(error));
        }
      }
      return outcomes;
    }, secured.base);
    assert.deepEqual(sent, ['sent', 'sent']);
    assert.equal(await jobs(), 0, 'no mix was started from the other page');

    // From the server's own page the cookie alone starts one: it was there to forge with.
    await page.goto(`${secured.base}/`);
    const own = await page.evaluate(async () => (await fetch('/mix/csrf/mix/start', { method: 'POST', headers: { 'content-type': 'application/json' }, body: '{}' })).status);
    assert.equal(own, 202);
    assert.equal(await jobs(), 1);
    await page.evaluate(async () => fetch('/session', { method: 'DELETE' }));
    await page.close();
  } finally {
    elsewhere.close();
    secured.child.kill('SIGTERM');
  }
});

const RUNNING = ['running', 'loading_stems', 'aligning_stems', 'processing_tracks', 'mixing', 'mastering', 'exporting'];

/** Waits until the page shows `jobId` running (any stage between queued and complete). */
async function untilShownRunning(page, jobId) {
  await page.waitForFunction(([id, running]) => running.includes(document.querySelector(`.job[data-job-id="${id}"]`)?.dataset.state), [jobId, RUNNING], { timeout: DEADLINE_MS });
}

/** Uploads the test stems to `project`, mixes them (8 s) and waits until the mix is complete. */
async function mixedProject(base, project) {
  const jobId = await startLongMix(base, project, {});
  await until(async () => (await jobState(base, project, jobId)) === 'complete');
}

/** Uploads the test stems to `project` and starts a mix of about ten minutes (an offset stem). */
async function startLongMix(base, project, settings = { tracks: { 'drums.wav': { offset_ms: 600_000 } } }) {
  const form = new FormData();
  for (const file of stems) form.append('file', new Blob([readFileSync(file)]), path.basename(file));
  const uploaded = await fetch(`${base}/projects/${project}/stems`, { method: 'POST', body: form });
  assert.equal(uploaded.status, 201);
  const started = await (await fetch(`${base}/mix/${project}/mix/start`, { method: 'POST', body: JSON.stringify(settings), headers: { 'content-type': 'application/json' } })).json();
  return started.data.job_id;
}

async function jobState(base, project, jobId) {
  return (await (await fetch(`${base}/mix/${project}/mix/job/${jobId}/status`)).json()).data.state;
}

async function until(condition) {
  const deadline = Date.now() + DEADLINE_MS;
  while (!(await condition())) {
    assert.ok(Date.now() < deadline, 'timed out');
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
}

/** A TCP proxy in front of the server whose connections the test can cut, and refuse for a while. */
async function cuttableProxy(target) {
  const sockets = new Set();
  let blocked = false;
  const [host, port] = target.split(':');
  const proxy = net.createServer((client) => {
    if (blocked) return client.destroy();
    const upstream = net.connect(Number(port), host);
    for (const socket of [client, upstream]) {
      sockets.add(socket);
      socket.on('close', () => sockets.delete(socket));
      socket.on('error', () => {});
    }
    client.pipe(upstream).pipe(client);
    client.on('close', () => upstream.destroy());
    upstream.on('close', () => client.destroy());
  });
  await new Promise((resolve) => proxy.listen(0, '127.0.0.1', resolve));
  return {
    base: `http://127.0.0.1:${proxy.address().port}`,
    cut() {
      blocked = true;
      for (const socket of sockets) socket.destroy();
    },
    unblock() { blocked = false; },
    close() { proxy.close(); for (const socket of sockets) socket.destroy(); },
  };
}

test('a stream cut while the job ends: the page resumes from its cursor and shows the end', async () => {
  const proxy = await cuttableProxy(server.address);
  const page = await context.newPage();
  const streams = [];
  // Every (re)connection of the project's feed, with the cursor it resumed from, if any.
  page.on('request', async (request) => {
    if (request.url().endsWith('/mix/browser-cut/mix/events')) streams.push((await request.allHeaders())['last-event-id'] ?? null);
  });
  page.on('websocket', (socket) => {
    if (socket.url().includes('/mix/browser-cut/mix/ws')) streams.push(new URL(socket.url()).searchParams.get('last_event_id'));
  });
  const jobId = await startLongMix(server.base, 'browser-cut');
  try {
    await page.goto(`${proxy.base}/#browser-cut`);
    await untilShownRunning(page, jobId);
    // The job list can show the run before the stream has opened; cut an open stream, not its start.
    await page.waitForFunction(() => document.querySelector('#transport').textContent === 'Server-Sent Events', null, { timeout: DEADLINE_MS });
    proxy.cut();
    await page.waitForFunction(() => document.querySelector('#transport').textContent.includes('reconnecting'), null, { timeout: DEADLINE_MS });
    await until(async () => (await jobState(server.base, 'browser-cut', jobId)) === 'complete');
    assert.notEqual(await page.getAttribute(`.job[data-job-id="${jobId}"]`, 'data-state'), 'complete', 'the page had not seen the end before reconnecting');
    proxy.unblock();
    await page.waitForSelector(`.job[data-job-id="${jobId}"][data-state=complete] .result:not([hidden])`, { timeout: DEADLINE_MS });
    assert.ok(streams.length >= 2 && streams.at(-1) !== null, `the reconnect (SSE or WebSocket) sent its cursor: ${JSON.stringify(streams)}`);
  } finally {
    await page.close();
    proxy.close();
  }
});

test('the server restarted mid-mix with the page open: the page reconnects by itself and shows the job complete', async () => {
  const first = await startServer();
  const page = await context.newPage();
  const jobId = await startLongMix(first.base, 'browser-restart');
  await page.goto(`${first.base}/#browser-restart`);
  await untilShownRunning(page, jobId);
  const exited = new Promise((resolve) => first.child.on('exit', resolve));
  first.child.kill('SIGTERM');
  assert.equal(await exited, 0);
  const second = await startServer([], { data: first.data, addr: first.address });
  try {
    await page.waitForSelector(`.job[data-job-id="${jobId}"][data-state=complete] .result:not([hidden])`, { timeout: DEADLINE_MS });
    await page.waitForFunction(() => document.querySelector('.job[data-state=complete] canvas.waveform')?.dataset.drawn === 'true', null, { timeout: DEADLINE_MS });
    assert.equal(await page.locator('.job').count(), 1);
  } finally {
    await page.close();
    second.child.kill('SIGTERM');
  }
});

test('switching projects quickly never shows another project\'s jobs', async () => {
  const jobId = await startLongMix(server.base, 'switch-a');
  await until(async () => (await jobState(server.base, 'switch-a', jobId)) === 'complete');
  const page = await context.newPage();
  // Project A's job list answers late: after the page has moved on to B.
  let answered;
  const late = new Promise((resolve) => { answered = resolve; });
  await page.route('**/mix/switch-a/mix/jobs', async (route) => {
    await new Promise((resolve) => setTimeout(resolve, 1000));
    await route.continue();
    answered();
  });
  const asked = page.waitForRequest('**/mix/switch-a/mix/jobs');
  await page.goto(`${server.base}/#switch-a`);
  await asked;
  await page.evaluate(() => { location.hash = '#switch-b'; });
  await late;
  await page.waitForFunction(() => document.querySelector('#project-id').value === 'switch-b');
  await page.waitForTimeout(200);
  assert.equal(await page.locator('#jobs .job').count(), 0, 'B has no jobs');
  await page.close();
});

test('a finished mix is drawn from its analysis; a fresh load has no errors and no failed requests', async () => {
  const page = await context.newPage();
  const problems = [];
  const wavRequests = [];
  page.on('console', (message) => message.type() === 'error' && problems.push(`console: ${message.text()}`));
  page.on('pageerror', (error) => problems.push(`page: ${error.message}`));
  // A player stops downloading once it has what it needs (preload=metadata): not a failure.
  page.on('requestfailed', (request) => request.resourceType() !== 'media' && problems.push(`failed: ${request.url()} ${request.failure()?.errorText}`));
  page.on('response', (response) => response.status() >= 400 && problems.push(`${response.status()}: ${response.url()}`));
  page.on('request', (request) => request.url().endsWith('.wav') && wavRequests.push(request.resourceType()));
  await mixedProject(server.base, 'drawn-mix');
  await page.goto(`${server.base}/#drawn-mix`);
  await page.waitForFunction(() => document.querySelector('.job[data-state=complete] canvas.waveform')?.dataset.drawn === 'true', null, { timeout: DEADLINE_MS });
  await page.waitForFunction(() => document.querySelector('.job[data-state=complete] canvas.loudness')?.dataset.drawn === 'true', null, { timeout: DEADLINE_MS });
  assert.ok(wavRequests.every((type) => type === 'media'), `only the player asks for the WAV: ${wavRequests}`);
  // The project picker lists the projects, newest first, and filters as one types.
  await page.waitForSelector('.project-pick[data-project=drawn-mix]');
  await page.fill('#project-search', 'drawn');
  assert.deepEqual(await page.$$eval('.project-pick', (buttons) => buttons.map((b) => b.dataset.project)), ['drawn-mix']);
  await page.fill('#project-search', '');
  mkdirSync(artifacts, { recursive: true });
  await page.screenshot({ path: path.join(artifacts, 'dashboard-1280x800.png') });
  await page.setViewportSize({ width: 360, height: 740 });
  const overflow = await page.evaluate(() => document.documentElement.scrollWidth - document.documentElement.clientWidth);
  assert.ok(overflow <= 1, `the page is ${overflow}px wider than a 360 px phone`);
  await page.screenshot({ path: path.join(artifacts, 'dashboard-360x740.png') });
  assert.deepEqual(problems, []);
  await page.close();
});

test('a reference picked from the stems is matched, not mixed: both spectra are plotted and each stem shows its auto gain', async () => {
  const page = await context.newPage();
  await page.goto(`${server.base}/#matched`);
  await page.setInputFiles('#file-input', stems);
  await page.waitForFunction((n) => document.querySelectorAll('#reference option').length === n + 1, stems.length, { timeout: DEADLINE_MS });
  const offered = await page.$$eval('#reference option', (options) => options.map((o) => o.textContent));
  assert.deepEqual([offered[0], ...offered.slice(1).sort()], ['None', 'bass.flac', 'drums.wav', 'pad.wav']);
  await page.selectOption('#reference', { label: 'pad.wav' });
  assert.equal(await page.isDisabled('#target-lufs'), true, "the reference's loudness is the target");
  await page.check('#auto-balance');
  await page.click('#start-mix');
  await page.waitForSelector('.job[data-state=complete]', { timeout: DEADLINE_MS });
  await page.waitForFunction(() => document.querySelector('.job[data-state=complete] canvas.spectrum')?.dataset.drawn === 'with-reference', null, { timeout: DEADLINE_MS });
  const rows = await page.$$eval('.job[data-state=complete] .report div', (divs) => divs.map((div) => div.textContent));
  assert.ok(rows.some((row) => /^Referencepad\.wav · -\d+\.\d LUFS$/.test(row)), `${rows}`);
  assert.ok(rows.some((row) => /^Tonal match\d+\.\d\d dB → \d+\.\d\d dB off the reference$/.test(row)), `${rows}`);
  const gains = rows.filter((row) => row.startsWith('Auto gain'));
  assert.equal(gains.length, 2, `the two stems mixed, not the reference: ${gains}`);
  const named = gains.map((row) => row.match(/^Auto gain · (drums\.wav|bass\.flac)[+-]\d+\.\d dB \(-\d+\.\d LUFS as uploaded\)$/)?.[1]).sort();
  assert.deepEqual(named, ['bass.flac', 'drums.wav'], `${gains}`);
  await page.close();
});

test('two finished mixes play A/B at the same position with their reports side by side', async () => {
  await mixedProject(server.base, 'compared');
  const page = await context.newPage();
  await page.goto(`${server.base}/#compared`);
  await page.waitForSelector('.job[data-state=complete]', { timeout: DEADLINE_MS });
  // A second mix of the same project.
  await page.click('#start-mix');
  await page.waitForFunction(() => document.querySelectorAll('.job[data-state=complete]').length === 2, null, { timeout: DEADLINE_MS });
  for (const pick of await page.$$('.job[data-state=complete] .compare-pick')) await pick.check();
  await page.waitForSelector('#compare:not([hidden])');
  assert.equal(await page.locator('#compare .report div').count(), 10, 'both reports');
  await page.waitForFunction(() => document.querySelector('#compare-a').readyState >= 1 && document.querySelector('#compare-b').readyState >= 1, null, { timeout: DEADLINE_MS });
  await page.evaluate(() => { document.querySelector('#compare-a').currentTime = 3.5; });
  await page.click('#compare-switch');
  assert.equal(await page.evaluate(() => document.querySelector('#compare').dataset.playing), 'b');
  assert.ok(Math.abs((await page.evaluate(() => document.querySelector('#compare-b').currentTime)) - 3.5) < 0.05, 'B picks up where A was');
  await page.close();
});
