// The browser side of the gateway's browser tests (tests/gateway/test_browser.py, the node test):
// what a web app does with the gateway's browser endpoints, in plain JavaScript. The tests run it in
// a document of the gateway's own origin and call these functions through the DevTools protocol.
"use strict";

// POST a JSON body with a bearer token (fetch can send headers; EventSource cannot).
async function postJson(url, body, token) {
  const response = await fetch(url, {
    method: "POST",
    headers: {"Content-Type": "application/json", "Authorization": `Bearer ${token}`},
    body: JSON.stringify(body),
  });
  return {status: response.status, body: await response.json()};
}

// Read one reply with EventSource until its `done` event. Every message event is kept with the
// id it carried; `opens` counts connections (a resume is a second one), `drops` connection errors.
function collect(url, timeoutMs) {
  return new Promise((resolve, reject) => {
    const events = [];
    let opens = 0, drops = 0;
    const source = new EventSource(url);
    const timer = setTimeout(() => {
      source.close();
      reject(new Error(`no done event in ${timeoutMs} ms: ${JSON.stringify({opens, drops, events})}`));
    }, timeoutMs);
    const finish = (outcome) => {
      clearTimeout(timer);
      source.close();
      resolve({outcome, opens, drops, events});
    };
    source.onopen = () => { opens += 1; };
    source.onmessage = (e) => { events.push({id: e.lastEventId, data: JSON.parse(e.data)}); };
    source.addEventListener("done", () => finish("done"));
    source.addEventListener("error", (e) => {
      if (e instanceof MessageEvent) finish(`error: ${e.data}`);  // the server's `event: error`
      else drops += 1;  // the connection failed: EventSource reconnects with Last-Event-ID
    });
  });
}

// One chat turn over the gateway's WebSocket: send one JSON message, gather the JSON messages
// that come back until one says it is the last.
function chat(url, message, isLast, timeoutMs) {
  return new Promise((resolve, reject) => {
    const received = [];
    const socket = new WebSocket(url);
    const timer = setTimeout(() => {
      socket.close();
      reject(new Error(`no last message in ${timeoutMs} ms: ${JSON.stringify(received)}`));
    }, timeoutMs);
    socket.onopen = () => socket.send(JSON.stringify(message));
    socket.onerror = () => { clearTimeout(timer); reject(new Error("websocket error")); };
    socket.onmessage = (e) => {
      const data = JSON.parse(e.data);
      received.push(data);
      if (isLast(data)) {
        clearTimeout(timer);
        socket.close();
        resolve(received);
      }
    };
  });
}
