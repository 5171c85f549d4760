// uWebSockets.js as a pub/sub relay for wrs-bench, addressed like Nchan:
//   subscribers  ws://HOST:PORT/sub/{channel}   (subscribed to the topic)
//   publishers   ws://HOST:PORT/pub/{channel}   (every message received is
//                                                app.publish'ed to it)
// Settings (environment): UWS_PORT (18084), UWS_HOST (127.0.0.1),
// UWS_COMPRESSION=shared (permessage-deflate with uWS.SHARED_COMPRESSOR,
// i.e. without context takeover; default off), UWS_TLS_CERT and
// UWS_TLS_KEY (PEM files: serve wss:// with uWS's SSLApp).
'use strict';
const uWS = require('@trufflesuite/uws-js-unofficial');

const port = Number(process.env.UWS_PORT || 18084);
const host = process.env.UWS_HOST || '127.0.0.1';
const compression = process.env.UWS_COMPRESSION === 'shared' ? uWS.SHARED_COMPRESSOR : uWS.DISABLED;
const tls = process.env.UWS_TLS_CERT
  ? { cert_file_name: process.env.UWS_TLS_CERT, key_file_name: process.env.UWS_TLS_KEY }
  : null;
const app = tls ? uWS.SSLApp(tls) : uWS.App();
const common = {
  compression,
  maxPayloadLength: 16 * 1024 * 1024,
  // wrs-bench bounds how far a publisher runs ahead; never drop or close.
  maxBackpressure: 64 * 1024 * 1024,
  closeOnBackpressureLimit: false,
  idleTimeout: 0,
  upgrade: (res, req, context) => {
    res.upgrade({ channel: req.getParameter(0) }, req.getHeader('sec-websocket-key'),
      req.getHeader('sec-websocket-protocol'), req.getHeader('sec-websocket-extensions'), context);
  },
};
app.ws('/sub/:channel', { ...common, open: (ws) => { ws.subscribe(ws.getUserData().channel); } });
app.ws('/pub/:channel', {
  ...common,
  message: (ws, message, isBinary) => {
    app.publish(ws.getUserData().channel, message, isBinary, compression !== uWS.DISABLED);
  },
});
app.listen(host, port, (socket) => {
  if (!socket) {
    console.error(`uws: cannot listen on ${host}:${port}`);
    process.exit(1);
  }
  console.log(`uws: listening on ${host}:${port}${tls ? ' (TLS)' : ''}, compression ${process.env.UWS_COMPRESSION || 'off'}`);
});
