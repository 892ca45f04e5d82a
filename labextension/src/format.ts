/**
 * What the status bar item and its panel say about one Shared GPU kernel, from the server
 * extension's `ui_state` (provisioner/ui_state.py). Pure functions: no DOM, no requests.
 */

export interface IQueue {
  position: number;
  length: number;
  reason?: string | null; // why it waits, from the broker (broker/core/waiting.py)
}

export interface ICheckpoint {
  host: string;
  bytes: number;
  since: number;
}

/** One kernel's state, as `GET shared-gpu/kernels` returns it. */
export interface IUiState {
  kernel_id: string;
  state: string;
  message: string | null;
  queue: IQueue | null;
  host: string | null;
  slot: string | null;
  kind: string | null;
  device: string | null;
  lease_age_s: number | null;
  idle_s: number | null;
  suspend_in_s: number | null;
  busy: boolean;
  policy: { [key: string]: unknown } | null;
  quota: { [key: string]: unknown } | null;
  checkpoint: ICheckpoint | null;
}

/** "1h 02m", "5m 03s", "12s" (as %gpu writes durations). */
export function duration(seconds: number): string {
  const s = Math.max(0, Math.round(seconds));
  const pad = (n: number) => String(n).padStart(2, '0');
  if (s >= 3600) {
    return `${Math.floor(s / 3600)}h ${pad(Math.floor((s % 3600) / 60))}m`;
  }
  if (s >= 60) {
    return `${Math.floor(s / 60)}m ${pad(s % 60)}s`;
  }
  return `${s}s`;
}

/** "512 B", "1.2 MiB". */
export function size(n: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB'];
  let value = n;
  for (const unit of units) {
    if (Math.abs(value) < 1024 || unit === 'GiB') {
      return unit === 'B' ? `${value.toFixed(0)} B` : `${value.toFixed(1)} ${unit}`;
    }
    value /= 1024;
  }
  return `${value.toFixed(1)} GiB`;
}

function num(d: { [key: string]: unknown } | null, key: string): number | null {
  const value = d ? d[key] : undefined;
  return typeof value === 'number' ? value : null;
}

/** "0.25 of 2 GPU-h", "0.25 GPU-h (no limit)", or null when the broker sent none. */
export function quotaShort(state: IUiState): string | null {
  const used = num(state.quota, 'used_hours');
  if (used === null) {
    return null;
  }
  const limit = num(state.quota, 'limit_hours');
  return limit === null ? `${used.toFixed(2)} GPU-h` : `${used.toFixed(2)} of ${limit} GPU-h`;
}

/** The status bar's one line. */
export function statusText(state: IUiState): string {
  const where = state.host ? ` on ${state.host} slot ${state.slot}` : '';
  let text: string;
  switch (state.state) {
    case 'unattached':
      text = 'no GPU yet (the first cell takes one)';
      break;
    case 'queued':
      text = state.queue
        ? `queued ${state.queue.position} of ${state.queue.length}`
        : 'queued';
      break;
    case 'starting':
      text = `starting${where}`;
      break;
    case 'running':
      text = `running${where}`;
      if (state.suspend_in_s !== null && !state.busy) {
        text += ` · suspend in ${duration(state.suspend_in_s)}`;
      }
      break;
    case 'suspended':
      text = 'suspended (the next cell resumes it)';
      break;
    default:
      text = state.state; // suspending, resuming, reconnecting, failed, ended
  }
  const quota = quotaShort(state);
  if (quota && state.state !== 'ended') {
    text += ` · ${quota}`;
  }
  return `Shared GPU: ${text}`;
}

/** The panel's lines (what %gpu shows), label and value. */
export function panelLines(state: IUiState, now: number): [string, string][] {
  const lines: [string, string][] = [['state', state.state + (state.busy ? ' (busy)' : '')]];
  if (state.host) {
    lines.push(['slot', `${state.slot} on host ${state.host} (${state.kind ?? '?'})`]);
    lines.push(['device', state.device ?? 'unknown']);
  } else if (state.kind) {
    lines.push(['kind', state.kind]);
  }
  if (state.queue) {
    let queue = `position ${state.queue.position} of ${state.queue.length}`;
    if (state.queue.reason) {
      queue += `: ${state.queue.reason}`;
    }
    lines.push(['queue', queue]);
  }
  if (state.lease_age_s !== null) {
    lines.push(['lease age', duration(state.lease_age_s)]);
  }
  if (state.idle_s !== null) {
    lines.push(['idle', duration(state.idle_s)]);
  }
  const after = num(state.policy, 'idle_suspend_after');
  const whenQueued = num(state.policy, 'idle_suspend_when_queued');
  if (after !== null) {
    let rule = `after ${duration(after)} idle`;
    if (whenQueued !== null && whenQueued < after) {
      rule += ` (${duration(whenQueued)} while others wait)`;
    }
    if (state.suspend_in_s !== null) {
      rule += `; ${duration(state.suspend_in_s)} left`;
    }
    lines.push(['suspend', rule]);
  }
  if (state.checkpoint) {
    const cp = state.checkpoint;
    lines.push([
      'saved state',
      `${size(cp.bytes)} on ${cp.host}, since ${duration(now - cp.since)} ago`
    ]);
  }
  const used = num(state.quota, 'used_hours');
  if (used !== null) {
    const limit = num(state.quota, 'limit_hours');
    let quota = `${used.toFixed(2)} GPU-hours used` + (limit === null ? ' (no limit)' : ` of ${limit} today`);
    const resets = num(state.quota, 'resets_at');
    if (resets !== null && limit !== null) {
      quota += `; resets in ${duration(resets - now)}`;
    }
    lines.push(['quota', quota]);
  }
  if (state.message) {
    lines.push(['note', state.message]);
  }
  return lines;
}

/** States that change within seconds: the item polls faster while in one. */
export function isTransient(state: IUiState | null): boolean {
  return (
    state !== null &&
    ['queued', 'starting', 'suspending', 'resuming', 'reconnecting'].includes(state.state)
  );
}
