// Our own server's API: the page's configuration, and streamed chat completions (server-sent events).

export class ApiError extends Error {
  constructor(status, message, code) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

function headers(apiKey, json) {
  const h = {};
  if (apiKey) h.Authorization = `Bearer ${apiKey}`;
  if (json) h["Content-Type"] = "application/json";
  return h;
}

// The server's error ({"error": {"message", "code"}}), in words a person can act on.
async function errorOf(response) {
  let message = `${response.status} ${response.statusText}`.trim();
  let code = null;
  try {
    const body = await response.json();
    if (body && body.error) {
      message = body.error.message || message;
      code = body.error.code || null;
    }
  } catch { /* not JSON: keep the status line */ }
  return new ApiError(response.status, message, code);
}

export async function getConfig(apiKey) {
  let response;
  try {
    response = await fetch("/web/config.json", {headers: headers(apiKey), cache: "no-store"});
  } catch (e) {
    throw new ApiError(0, "cannot reach the server", "network");
  }
  if (!response.ok) throw await errorOf(response);
  return response.json();
}

// POST /v1/chat/completions with stream: true; yields each event's JSON. Aborting `signal` closes the
// connection, and the server frees the request when it sees the client go.
export async function* streamChat(body, apiKey, signal) {
  let response;
  try {
    response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(apiKey, true), body: JSON.stringify(body), signal,
    });
  } catch (e) {
    if (signal.aborted) throw e;
    throw new ApiError(0, "cannot reach the server", "network");
  }
  if (!response.ok) throw await errorOf(response);
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  try {
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, {stream: true});
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        for (const line of block.split("\n")) {
          if (!line.startsWith("data:")) continue;
          const data = line.slice(5).trim();
          if (data === "[DONE]") return;
          const event = JSON.parse(data);
          if (event.error) throw new ApiError(500, event.error.message, event.error.code);
          yield event;
        }
      }
    }
  } finally {
    reader.cancel().catch(() => {});
  }
  throw new ApiError(0, "the connection closed before the answer was complete", "incomplete");
}
