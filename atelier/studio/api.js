// Every call the studio makes: the key in the Authorization header, errors in OpenAI's shape
// {"error": {"message", "type", "param", "code"}} turned into an ApiError.

let key = "";

export function setKey(secret) {
  key = secret;
}

export class ApiError extends Error {
  constructor(status, error) {
    super(error.message || `HTTP ${status}`);
    this.name = "ApiError";
    this.status = status;
    this.type = error.type ?? null;
    this.param = error.param ?? null;
    this.code = error.code ?? null;
  }
}

async function errorOf(res) {
  let body = null;
  try {
    body = await res.json();
  } catch {
    // not JSON: fall through to a plain HTTP error
  }
  const error = body && body.error && typeof body.error === "object"
    ? body.error : { message: `HTTP ${res.status} ${res.statusText}`, type: "http_error" };
  return new ApiError(res.status, error);
}

/** fetch(path) with the key; `json` or `form` as the body. Returns parsed JSON, or the Response when raw. */
export async function api(path, { method, json, form, signal, raw = false } = {}) {
  const headers = { Authorization: `Bearer ${key}` };
  let body;
  if (json !== undefined) {
    headers["Content-Type"] = "application/json";
    body = JSON.stringify(json);
  } else if (form !== undefined) {
    body = form; // FormData: the browser sets the multipart boundary
  }
  let res;
  try {
    res = await fetch(path, { method: method || (body === undefined ? "GET" : "POST"), headers, body, signal });
  } catch (e) {
    if (e.name === "AbortError") throw e;
    throw new ApiError(0, { message: `cannot reach the server (${e.message})`, type: "network_error" });
  }
  if (!res.ok) throw await errorOf(res);
  return raw ? res : res.json();
}

/** The bytes of an artifact (or any keyed GET) as a Blob. */
export async function blob(path, signal) {
  return (await api(path, { raw: true, signal })).blob();
}

/**
 * POST `json` and read the server-sent events: yields {event, data} until `data: [DONE]`.
 * An error event mid-stream (OpenAI's shape) is thrown as an ApiError.
 */
export async function* sse(path, json, signal) {
  const res = await api(path, { json, signal, raw: true });
  const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value.replaceAll("\r\n", "\n");
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        let event = "message";
        const data = [];
        for (const line of block.split("\n")) {
          if (line.startsWith("event:")) event = line.slice(6).trim();
          else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
        }
        if (!data.length) continue;
        const text = data.join("\n");
        if (text === "[DONE]") return;
        const obj = JSON.parse(text);
        if (obj.error) throw new ApiError(res.status, obj.error);
        // Stop means stop: events already buffered are dropped too.
        if (signal?.aborted) throw new DOMException("the request was stopped", "AbortError");
        yield { event, data: obj };
      }
    }
  } finally {
    reader.cancel().catch(() => {});
  }
}
