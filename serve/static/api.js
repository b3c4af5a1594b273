// Calls to the service's /v1 API. A bearer token, when the service asks for one, is kept in
// localStorage and sent with every call (and as ?access_token= on the event stream).
const TOKEN_KEY = "vaewatch.token";

export function token() {
  return localStorage.getItem(TOKEN_KEY) || "";
}

function authHeaders() {
  const value = token();
  return value ? { Authorization: `Bearer ${value}` } : {};
}

export class ApiError extends Error {}

export async function call(path, { method = "GET", json, body } = {}) {
  const headers = authHeaders();
  if (json !== undefined) {
    headers["Content-Type"] = "application/json";
    body = JSON.stringify(json);
  }
  const response = await fetch(path, { method, headers, body });
  if (response.status === 401) {
    const given = window.prompt("This service needs a bearer token:");
    if (given) {
      localStorage.setItem(TOKEN_KEY, given);
      return call(path, { method, json, body: json === undefined ? body : undefined });
    }
  }
  const data = await response.json().catch(() => null);
  if (!response.ok) {
    const message = data && data.error ? data.error.message : response.statusText;
    throw new ApiError(`${response.status}: ${message}`);
  }
  return data;
}

export function pngSource(b64) {
  return `data:image/png;base64,${b64}`;
}

const IMAGE_SUFFIXES = [".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif"];

export function isImageFile(file) {
  const name = file.name.toLowerCase();
  return file.type.startsWith("image/") || IMAGE_SUFFIXES.some((suffix) => name.endsWith(suffix));
}

// Image files -> the 784 grey values (0..255) the model sees of each: made by the service with
// the bundle's preprocessing (never in the browser, whose decoding and scaling differ).
export async function modelInputs(files) {
  const form = new FormData();
  for (const file of files) form.append("images", file, file.name);
  const answer = await call("/v1/explain", { method: "POST", body: form });
  return answer.results.map((result) => result.input);
}

export function element(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (name === "class") node.className = value;
    else node.setAttribute(name, value);
  }
  for (const child of children) {
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

export function figure(src, caption, className) {
  return element("figure", {}, element("img", { src, alt: caption, class: `pixelated ${className}` }), caption);
}

export function details(rows) {
  const list = element("dl");
  for (const [term, value] of rows) list.append(element("dt", {}, term), element("dd", {}, value));
  return list;
}
