// Live updates: EventSource, else WebSocket, else polling. Project and global streams carry a
// cursor: an EventSource sends it back by itself when it reconnects (Last-Event-ID), the
// WebSocket sends it as ?last_event_id=, and the server answers with every job that changed in
// between, finished ones included. After any reconnect `onReconnect` runs too, so the page
// ends up showing exactly what the server holds.

const POLL_MS = 1000;
const MAX_RETRY_MS = 10_000;

export class LiveFeed {
  constructor({ sse, ws, poll, onStatus, onTransport, onReconnect = () => {} }) {
    Object.assign(this, { sse, ws, poll, onStatus, onTransport, onReconnect });
    this.stopped = false;
    this.retry = 1000;
    this.cursor = null;
    // Whether a transport ever worked here: only one that never did is given up for the next.
    this.everOpened = false;
  }

  start() {
    if (this.sse && 'EventSource' in window) this.startSse();
    else this.startWebSocket();
  }

  stop() {
    this.stopped = true;
    this.source?.close();
    this.socket?.close();
    clearTimeout(this.timer);
  }

  startSse() {
    this.source = new EventSource(this.sse);
    this.source.addEventListener('open', () => {
      if (this.everOpened) this.onReconnect();
      this.everOpened = true;
      this.onTransport('Server-Sent Events');
    });
    this.source.addEventListener('status', (event) => {
      // Kept for the WebSocket, should the EventSource give up: it resumes from here.
      if (event.lastEventId) this.cursor = event.lastEventId;
      this.onStatus(JSON.parse(event.data));
    });
    this.source.addEventListener('error', () => {
      if (this.stopped) return;
      if (!this.everOpened || this.source.readyState === EventSource.CLOSED) {
        // EventSource does not work here (a proxy, an old browser), or gave up: the next transport,
        // which keeps retrying if this one ever worked.
        this.source.close();
        this.onTransport('reconnecting…');
        this.startWebSocket();
      } else {
        this.onTransport('Server-Sent Events (reconnecting…)');
      }
    });
  }

  startWebSocket() {
    if (!this.ws || !('WebSocket' in window)) return this.startPolling();
    const url = new URL(this.ws, location.href);
    url.protocol = url.protocol === 'https:' ? 'wss:' : 'ws:';
    if (this.cursor) url.searchParams.set('last_event_id', this.cursor);
    const socket = new WebSocket(url);
    this.socket = socket;
    let opened = false;
    socket.addEventListener('open', () => {
      opened = true;
      if (this.everOpened) this.onReconnect();
      this.everOpened = true;
      this.retry = 1000;
      this.onTransport('WebSocket');
    });
    socket.addEventListener('message', (event) => {
      const frame = JSON.parse(event.data);
      if (frame.cursor) this.cursor = frame.cursor;
      if (frame.type === 'status') this.onStatus(frame.data);
    });
    socket.addEventListener('close', () => {
      if (this.stopped) return;
      if (!opened && !this.everOpened) return this.startPolling();
      this.onTransport('WebSocket (reconnecting…)');
      this.timer = setTimeout(() => !this.stopped && this.startWebSocket(), this.retry);
      this.retry = Math.min(this.retry * 2, MAX_RETRY_MS);
    });
  }

  startPolling() {
    if (!this.poll) return this.onTransport('not available');
    // One tick at a time: the next is scheduled when this one has answered.
    const tick = async () => {
      if (this.stopped) return;
      try {
        for (const status of await this.poll()) this.onStatus(status);
        this.onTransport('polling every second');
      } catch {
        this.onTransport('polling every second (reconnecting…)');
      } finally {
        if (!this.stopped) this.timer = setTimeout(tick, POLL_MS);
      }
    };
    tick();
  }
}
