// aeterna: the package's entry point. Apps use `aeterna/client` (the SDK);
// this module exports the same, plus the types of Aeterna's config and of what
// its control socket reports, for tools built around Aeterna.
export * from './client';
export type { Config } from './config/types';
export type { ReloadRecord, ReloadEvent, StatusReport } from './orchestrator/types';
export { ErrorCodes, type ErrorCode } from './errors';
