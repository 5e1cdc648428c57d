// A poller that runs while its page is shown: one call at a time, every `intervalMs`.
export class Poller {
  constructor(task, intervalMs = 2000) { this.task = task; this.interval = intervalMs; this.timer = null; this.running = false; }

  start() {
    if (this.running) return;
    this.running = true;
    const tick = async () => {
      if (!this.running) return;
      try { await this.task(); } catch (error) { console.warn('poll failed', error); }
      if (this.running) this.timer = setTimeout(tick, this.interval);
    };
    tick();
  }

  stop() { this.running = false; clearTimeout(this.timer); }
}
