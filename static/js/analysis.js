// Drawing a mix from its analysis.json (peaks, short-term loudness, ceiling hits, spectrum): the page never
// downloads the WAV for this; only the player streams it.

const accent = () => getComputedStyle(document.documentElement).getPropertyValue('--accent').trim() || '#5fb3ff';
const warning = () => getComputedStyle(document.documentElement).getPropertyValue('--warning').trim() || '#ff7a59';

export async function loadAnalysis(resultUrl) {
  const url = resultUrl.replace(/final_mix\.(wav|flac|mp3|opus)$/, 'analysis.json');
  const response = await fetch(url);
  if (!response.ok) throw new Error(`analysis: ${response.status}`);
  return response.json();
}

/** The waveform at the zoom level closest to the canvas's width, with ceiling hits marked. */
export function drawWaveform(canvas, analysis) {
  const level = analysis.waveform.find((l) => l.columns <= canvas.width * 2) ?? analysis.waveform[analysis.waveform.length - 1];
  const context = canvas.getContext('2d');
  const middle = canvas.height / 2;
  context.clearRect(0, 0, canvas.width, canvas.height);
  context.fillStyle = accent();
  for (let x = 0; x < canvas.width; x++) {
    const from = Math.floor((x * level.columns) / canvas.width);
    const to = Math.max(from + 1, Math.floor(((x + 1) * level.columns) / canvas.width));
    let low = 0, high = 0;
    for (let c = from; c < to && c < level.columns; c++) {
      low = Math.min(low, level.min[c]);
      high = Math.max(high, level.max[c]);
    }
    context.fillRect(x, middle - high * middle, 1, Math.max(1, (high - low) * middle));
  }
  context.fillStyle = warning();
  for (const seconds of analysis.ceiling_hits_s) {
    context.fillRect(Math.floor((seconds / analysis.duration_s) * canvas.width), 0, 1, 4);
  }
  canvas.dataset.drawn = 'true';
}

/** Short-term loudness over time against the target line. */
export function drawLoudness(canvas, analysis, targetLufs) {
  const context = canvas.getContext('2d');
  const [top, bottom] = [0, -40];
  const y = (lufs) => ((top - Math.max(bottom, Math.min(top, lufs))) / (top - bottom)) * canvas.height;
  context.clearRect(0, 0, canvas.width, canvas.height);
  context.strokeStyle = warning();
  context.setLineDash([4, 4]);
  context.beginPath();
  context.moveTo(0, y(targetLufs));
  context.lineTo(canvas.width, y(targetLufs));
  context.stroke();
  context.setLineDash([]);
  context.strokeStyle = accent();
  context.beginPath();
  const points = analysis.short_term_lufs;
  let drawing = false;
  points.forEach((lufs, second) => {
    if (lufs === null) { drawing = false; return; }
    const x = ((second + 1) / points.length) * canvas.width;
    if (drawing) context.lineTo(x, y(lufs)); else context.moveTo(x, y(lufs));
    drawing = true;
  });
  context.stroke();
  canvas.dataset.drawn = 'true';
}

/**
 * The mix's 1/3-octave spectrum over the reference's (dashed) when it matched one: levels relative
 * to each file's loudness, on a log-frequency axis.
 */
export function drawSpectrum(canvas, analysis) {
  const { bands_hz: bands, mix_db: mix, reference_db: reference } = analysis.spectrum;
  const context = canvas.getContext('2d');
  const levels = [...mix, ...(reference || [])].filter((db) => db !== null);
  const top = Math.ceil(Math.max(0, ...levels) / 6) * 6;
  const bottom = top - 48;
  const x = (i) => ((Math.log(bands[i]) - Math.log(bands[0])) / (Math.log(bands[bands.length - 1]) - Math.log(bands[0]))) * (canvas.width - 8) + 4;
  const y = (db) => ((top - Math.max(bottom, Math.min(top, db))) / (top - bottom)) * canvas.height;
  context.clearRect(0, 0, canvas.width, canvas.height);
  const line = (values, color, dash) => {
    context.strokeStyle = color;
    context.setLineDash(dash);
    context.beginPath();
    let drawing = false;
    values.forEach((db, i) => {
      if (db === null) { drawing = false; return; }
      if (drawing) context.lineTo(x(i), y(db)); else context.moveTo(x(i), y(db));
      drawing = true;
    });
    context.stroke();
  };
  if (reference) line(reference, warning(), [4, 4]);
  line(mix, accent(), []);
  context.setLineDash([]);
  canvas.dataset.drawn = reference ? 'with-reference' : 'true';
}
