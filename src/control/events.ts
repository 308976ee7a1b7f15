// `aeterna events`: every operator event (a reload's phases and outcome, whoever started it; a crash, a restart, an
// upgrade, the stop) goes to each subscriber as it happens. A subscriber is a control connection that stays open.
// Nothing a subscriber does may stall the daemon: publishing encodes each event once and only queues it on each
// connection; the subscribers are at most MAX_SUBSCRIBERS, and one that lets more than MAX_BACKLOG_BYTES pile up
// unread is dropped with a last line saying so, while the others and the daemon go on.
import { AeternaError } from '../errors';
import type { Logger } from '../log';
import type { EventSink, OperatorEvent } from '../orchestrator/types';
import { encodeMessage } from './protocol';

/** Subscribers at once: each holds a control connection (and its fd) for as long as it likes. */
export const MAX_SUBSCRIBERS = 8;
/** Unread bytes queued for one subscriber before it is dropped (a few thousand events). */
export const MAX_BACKLOG_BYTES = 1024 * 1024;

export class EventHub {
  private readonly sinks = new Set<EventSink>();
  /** Subscribers dropped for not reading, since Aeterna started (logged once per burst). */
  private dropped = 0;

  constructor(
    private readonly log: Logger,
    private readonly maxSubscribers = MAX_SUBSCRIBERS,
    private readonly maxBacklogBytes = MAX_BACKLOG_BYTES,
  ) {}

  get count(): number {
    return this.sinks.size;
  }

  /** Add a subscriber; the returned function removes it. Throws E_CONTROL_UNAVAILABLE at the limit. */
  subscribe(sink: EventSink): () => void {
    if (this.sinks.size >= this.maxSubscribers)
      throw new AeternaError(
        'E_CONTROL_UNAVAILABLE',
        `too many event subscribers (limit ${this.maxSubscribers}): end another \`aeterna events\` first`,
      );
    this.sinks.add(sink);
    return () => this.sinks.delete(sink);
  }

  publish(event: OperatorEvent): void {
    if (this.sinks.size === 0) return;
    const line = encodeMessage({ type: 'event', event });
    for (const sink of [...this.sinks]) {
      if (sink.backlog() + line.length > this.maxBacklogBytes) {
        this.sinks.delete(sink);
        if (this.dropped++ % 100 === 0)
          this.log.warn(
            { limit_bytes: this.maxBacklogBytes, dropped: this.dropped },
            'an `aeterna events` subscriber does not read its events: dropped',
          );
        sink.close(
          encodeMessage({
            type: 'error',
            code: 'E_CONTROL_UNAVAILABLE',
            message: `dropped: more than ${this.maxBacklogBytes} bytes of events were left unread`,
          }),
        );
        continue;
      }
      sink.send(line);
    }
  }

  /** Aeterna stops: each subscriber gets a last line and its end. */
  close(reason: string): void {
    const line = encodeMessage({ type: 'result', ok: true, ended: reason });
    for (const sink of this.sinks) sink.close(line);
    this.sinks.clear();
  }
}
