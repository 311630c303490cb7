// The dashboard in Debian's Chromium, driven by playwright-core, against a real mixd on port 0.
// Run by scripts/test after `cargo test` has built target/debug/mixd.

import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync, spawn } from 'node:child_process';
import { mkdirSync, mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
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

function startServer(extraArgs = []) {
  const data = mkdtempSync(path.join(tmpdir(), 'mixd-browser-data-'));
  const child = spawn(binary, ['serve', '--addr', '127.0.0.1:0', '--data-dir', data, '--log-format', 'json', '--mix-slots', '1', ...extraArgs], {
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
          if (address) resolve({ child, base: `http://${address}` });
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
  assert.equal(await page.getAttribute('.job[data-state=complete] a.download', 'href'), await page.getAttribute('.job[data-state=complete] audio', 'src'));

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
  await page.setViewportSize({ width: 390, height: 844 });
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

test('a queued job can be canceled from the page', async () => {
  const page = await context.newPage();
  await page.goto(`${server.base}/#browser-cancel`);
  await page.setInputFiles('#file-input', stems);
  await page.waitForFunction(() => document.querySelectorAll('#stems-table tbody tr').length === 3, null, { timeout: DEADLINE_MS });
  // One mixer slot: the second mix waits behind the first.
  await page.click('#start-mix');
  await page.waitForSelector('.job', { timeout: DEADLINE_MS });
  await page.waitForFunction(() => !document.querySelector('#start-mix').disabled);
  await page.click('#start-mix');
  await page.waitForFunction(() => document.querySelectorAll('.job').length === 2);
  const newest = page.locator('.job').first();
  await newest.locator('.cancel').click();
  await page.waitForSelector('.job[data-state=error]', { timeout: DEADLINE_MS });
  assert.match(await newest.locator('.job-message').textContent(), /You canceled this mix/);
  await page.waitForSelector('.job[data-state=complete]', { timeout: DEADLINE_MS });
  await page.close();
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
