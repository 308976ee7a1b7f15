// Aeterna's demo app: a plain Node HTTP server that serves on the socket
// Aeterna hands it as fd 3 (systemd's LISTEN_FDS convention), and drains
// gracefully on SIGTERM.
'use strict';
const http = require('node:http');

const started = new Date().toISOString();
const server = http.createServer((req, res) => {
  res.setHeader('content-type', 'application/json');
  res.end(JSON.stringify({ hello: 'from the demo app', pid: process.pid, generation: process.env.AETERNA_GENERATION, started }) + '\n');
});

const inherited = Number(process.env.LISTEN_FDS) > 0 && Number(process.env.LISTEN_PID) === process.pid;
if (inherited) {
  server.listen({ fd: 3 }, () => console.log(`demo app ${process.pid} serving on inherited fd 3 (${process.env.LISTEN_FDNAMES})`));
} else {
  // Outside Aeterna: bind the port ourselves, so the app runs the same in development.
  server.listen(8080, '127.0.0.1', () => console.log(`demo app ${process.pid} serving on 127.0.0.1:8080 (no LISTEN_FDS)`));
}

process.on('SIGTERM', () => {
  console.log(`demo app ${process.pid} draining`);
  server.close(() => process.exit(0));
  server.closeIdleConnections();
});
