// Talking to mixd: the envelope routes, and the words a musician reads for each error code.

export const STAGES = ['queued', 'running', 'loading_stems', 'aligning_stems', 'processing_tracks', 'mixing', 'mastering', 'exporting', 'complete'];
export const STAGE_LABELS = {
  queued: 'Queued', running: 'Starting', loading_stems: 'Loading', aligning_stems: 'Aligning',
  processing_tracks: 'Processing', mixing: 'Mixing', mastering: 'Mastering', exporting: 'Exporting',
  complete: 'Done', error: 'Failed',
};
export const FRIENDLY = {
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
  STORE_UNAVAILABLE: 'The server is busy recovering. Try again in a moment.',
  TOO_MANY_JOBS: 'Too many mixes are waiting in this project.',
  RATE_LIMITED: 'Too many changes in a short time: slow down a little.',
  QUOTA_EXCEEDED: "This project's stems would take more space than the server allows: delete some stems to make room.",
  TOO_MANY_STREAMS: 'Too many live views are open with this sign-in: close some tabs.',
  SERVER_BUSY: 'The server is at its limit of connections.',
};

/** "Try again in ..." from a `Retry-After` of whole seconds, or nothing. */
function whenToRetry(seconds) {
  const wait = Number(seconds);
  if (!Number.isFinite(wait) || wait <= 0) return '';
  return wait < 90 ? ` Try again in ${wait} second${wait === 1 ? '' : 's'}.` : ` Try again in ${Math.round(wait / 60)} minutes.`;
}

export const isFinished = (status) => status.state === 'complete' || status.state === 'error';

export function explain(envelope) {
  const friendly = FRIENDLY[envelope.error];
  const detail = envelope.message && envelope.message !== friendly ? ` (${envelope.message})` : '';
  return (friendly ? friendly + detail : envelope.message || 'Something went wrong.') + whenToRetry(envelope.retryAfter);
}

let onUnauthorized = () => {};
/** Called when a request finds the session gone (401). */
export function whenUnauthorized(callback) {
  onUnauthorized = callback;
}

/** A request to an envelope route: the parsed envelope with its HTTP status, never a throw. */
export async function api(method, path, { body, headers } = {}) {
  let response;
  try {
    response = await fetch(path, { method, body, headers });
  } catch {
    return { ok: false, error: 'NETWORK', message: 'The server cannot be reached. Check your connection.' };
  }
  if (response.status === 401 && path !== '/session') onUnauthorized('Your session has ended: sign in again.');
  try {
    return { status: response.status, retryAfter: response.headers.get('retry-after'), ...(await response.json()) };
  } catch {
    return { ok: false, status: response.status, error: 'INTERNAL', message: `Unexpected answer (${response.status}).` };
  }
}
