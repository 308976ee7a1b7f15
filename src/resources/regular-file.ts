// Opening a regular file without blocking lives at the ground now (src/regular-file.ts): the config loader reads
// files that way too, and config/ ranks below resources/. This name stays for the modules that still import it here.
export { NotARegularFile, openRegularFile } from '../regular-file';
