// Aeterna's own files under a config: its sockets, the checkpoint files (one per instance) and their temporary
// files, the default runtime directory. orchestration.watch never reloads for them, even in a watched directory: a
// checkpoint written every second into the app's own directory would otherwise reload every second.
import path from 'node:path';
import type { Config } from './config/types';
import { defaultRuntimeDir } from './config/runtime-dir';
import type { OwnFile } from './orchestrator/file-watch';
import { NotifySocket } from './resources/notify';
import { isTempOf } from './srp/checkpoint-file';
import { isInstanceCheckpointFile } from './srp/checkpoint-instances';

export function ownFiles(config: Config): OwnFile {
  const control = config.control.socketPath;
  const handoff = config.orchestration.stateHandoff;
  const exact = new Set([control, NotifySocket.pathFor(control), defaultRuntimeDir()]);
  if (handoff.enabled) exact.add(handoff.socketPath);
  const checkpoint = handoff.enabled && handoff.checkpoint.enabled ? handoff.checkpoint.path : null;
  if (checkpoint === null) return (file) => exact.has(file);
  exact.add(checkpoint);
  return (file) =>
    exact.has(file) ||
    (path.dirname(file) === path.dirname(checkpoint) && isTempOf(checkpoint, path.basename(file))) ||
    isInstanceCheckpointFile(checkpoint, file); // service.instances > 1: <path>.<i> and its temporary files
}
