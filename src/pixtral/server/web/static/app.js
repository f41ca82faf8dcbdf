// The chat page: conversations (kept in localStorage), attachments, streaming, settings.
// Plain DOM code, no framework; every piece of text reaches the page through textContent or the
// Markdown renderer (which builds nodes, never HTML strings).

import {ApiError, getConfig, streamChat} from "./api.js";
import {isImage, prepareImage} from "./images.js";
import {renderMarkdown} from "./markdown.js";

const $ = (id) => document.getElementById(id);
const KEYS = {conversations: "pixtral.conversations", current: "pixtral.current", settings: "pixtral.settings",
              apiKey: "pixtral.apiKey"};
const DEFAULT_SETTINGS = {system: "", temperature: 0, maxTokens: 512, resize: true, extra: ""};

function el(tag, className, children, attrs) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (attrs) for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (children) node.append(...children);
  return node;
}

function button(label, onClick, className, title) {
  const b = el("button", className, [label], {type: "button"});
  if (title) b.title = title;
  b.addEventListener("click", onClick);
  return b;
}

function loadJson(key, fallback) {
  try {
    const value = localStorage.getItem(key);
    return value === null ? fallback : JSON.parse(value);
  } catch {
    return fallback;
  }
}

// What comes back from localStorage is checked, not trusted: only known fields, strings as strings,
// images only as data:image URIs.
function cleanConversations(list) {
  if (!Array.isArray(list)) return [];
  const text = (v) => (typeof v === "string" ? v : "");
  return list.filter((c) => c && typeof c === "object" && Array.isArray(c.messages)).map((c) => ({
    id: text(c.id) || newId(),
    title: text(c.title) || "Chat",
    updated: Number(c.updated) || 0,
    messages: c.messages.filter((m) => m && ["user", "assistant", "error"].includes(m.role)).map((m) => ({
      role: m.role,
      text: text(m.text),
      images: Array.isArray(m.images) ? m.images.filter((u) => typeof u === "string" && u.startsWith("data:image/")) : [],
      stopped: m.stopped === true,
      finish: text(m.finish),
    })),
  }));
}

function newId() {
  return `${Date.now().toString(36)}-${Math.random().toString(36).slice(2, 8)}`;
}

const state = {
  config: null,
  apiKey: localStorage.getItem(KEYS.apiKey) || "",
  settings: {...DEFAULT_SETTINGS, ...loadJson(KEYS.settings, {})},
  conversations: cleanConversations(loadJson(KEYS.conversations, [])),
  currentId: loadJson(KEYS.current, null),
  attachments: [],   // {id, name, preview (blob: URL), ready (Promise), image (prepared) | null}
  busy: null,        // {controller, conv, msg, body (the element the answer streams into)}
  editing: null,     // index of the user message being edited
};

function current() {
  return state.conversations.find((c) => c.id === state.currentId) || null;
}

// ------------------------------------------------------------------ storage
function save() {
  try {
    const kept = state.conversations.filter((c) => c.messages.length);
    localStorage.setItem(KEYS.conversations, JSON.stringify(kept.map((c) => ({
      ...c, messages: c.messages.filter((m) => !(m.role === "assistant" && !m.text)),
    }))));
    localStorage.setItem(KEYS.current, JSON.stringify(state.currentId));
  } catch (e) {
    showNotice("The browser's storage is full, so this conversation will be lost on reload. " +
               "Delete old conversations to make room.");
  }
}

function saveSettings() {
  localStorage.setItem(KEYS.settings, JSON.stringify(state.settings));
}

// ------------------------------------------------------------------ notices and errors
function showNotice(text) {
  const notice = $("notice");
  notice.textContent = text;
  notice.hidden = !text;
}

// An error, in words a person can act on; the server's own message is always included.
function describeError(e) {
  if (!(e instanceof ApiError)) return `Something went wrong in the page: ${e.message}`;
  switch (e.code) {
    case "network": return "Cannot reach the server. Is pixtral serve still running?";
    case "incomplete": return "The connection closed before the answer was complete.";
    case "image_too_large": return `The server refused an image: ${e.message}`;
    case "invalid_image": return `The server could not read an image: ${e.message}`;
    case "too_many_images": return `Too many images for the server: ${e.message}`;
    case "request_too_large": return `The request is too large for the server: ${e.message}`;
    case "context_length_exceeded":
      return `The conversation is too long for the model: ${e.message}. Start a new chat or lower max tokens.`;
    case "queue_full": return `The server is busy: ${e.message}. Try again in a moment.`;
    case "model_loading": return "The model is still loading; try again in a moment.";
    case "invalid_api_key": return "The server refused the API key.";
  }
  return `The server answered ${e.status}: ${e.message}`;
}

// ------------------------------------------------------------------ API key
function askKey(message) {
  const dialog = $("key-dialog");
  $("key-error").textContent = message || "";
  $("key-error").hidden = !message;
  $("key-input").value = "";
  return new Promise((resolve) => {
    $("key-form").onsubmit = (event) => {
      const key = $("key-input").value.trim();
      if (!key) {
        event.preventDefault();
        return;
      }
      state.apiKey = key;
      localStorage.setItem(KEYS.apiKey, key);
      $("forget-key").hidden = false;
      resolve();
    };
    dialog.addEventListener("cancel", (event) => event.preventDefault());  // Escape cannot skip it
    if (!dialog.open) dialog.showModal();
    $("key-input").focus();
  });
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

async function connect() {
  let refused = false;
  for (;;) {
    try {
      state.config = await getConfig(state.apiKey);
      break;
    } catch (e) {
      if (e.status === 401) {
        await askKey(refused ? "The server refused that key; check it and try again." : "");
        refused = true;
      } else if (e.status === 503 || e.status === 0) {
        showNotice(e.code === "model_loading" ? "The model is loading\u2026" : describeError(e));
        await sleep(1500);
      } else {
        showNotice(describeError(e));
        return;
      }
    }
  }
  showNotice("");
  const config = state.config;
  $("model-name").textContent = config.model;
  $("forget-key").hidden = !state.apiKey;
  $("attach").hidden = !config.max_image_size;
  $("resize-size").textContent = config.max_image_size ? `(longest side ${config.max_image_size} px)` : "";
  updateBusy();
}

// ------------------------------------------------------------------ rendering
function renderSidebar() {
  const list = $("conversations");
  list.replaceChildren(...[...state.conversations].filter((c) => c.messages.length)
    .sort((a, b) => b.updated - a.updated).map((c) => {
      const open = button(c.title, () => selectConversation(c.id), "conv-title", c.title);
      const remove = button("\u00d7", () => deleteConversation(c.id), "conv-delete", "Delete this conversation");
      remove.setAttribute("aria-label", `Delete ${c.title}`);
      return el("li", c.id === state.currentId ? "active" : null, [open, remove]);
    }));
}

function imageList(urls, className) {
  return el("div", className, urls.map((src) => {
    const img = el("img", null, null, {alt: "attached image"});
    img.src = src;
    return img;
  }));
}

function userView(conv, msg, index) {
  if (state.editing === index) return editorView(conv, msg, index);
  const view = el("article", "msg user");
  if (msg.images.length) view.append(imageList(msg.images, "msg-images"));
  const text = el("div", "msg-text user-text");
  text.textContent = msg.text;  // what the user typed is shown as typed
  view.append(text, el("div", "msg-actions", [
    button("Edit", () => { state.editing = index; renderMessages(); }, "edit", "Edit and send again"),
  ]));
  return view;
}

function editorView(conv, msg, index) {
  const images = [...msg.images];
  const area = el("textarea", "edit-text", null, {rows: "3", "aria-label": "Edit message"});
  area.value = msg.text;
  const thumbs = el("div", "attachments");
  const drawThumbs = () => thumbs.replaceChildren(...images.map((src, i) => {
    const img = el("img", null, null, {alt: "attached image"});
    img.src = src;
    return el("figure", "thumb", [img, button("\u00d7", () => { images.splice(i, 1); drawThumbs(); }, "remove",
                                               "Remove this image")]);
  }));
  drawThumbs();
  const send = () => {
    if (!area.value.trim() && !images.length) return;
    state.editing = null;
    conv.messages.splice(index);  // the answer and everything after it go
    conv.messages.push({role: "user", text: area.value, images, stopped: false, finish: ""});
    generate(conv);
  };
  area.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      send();
    }
  });
  setTimeout(() => area.focus(), 0);
  return el("article", "msg user editing", [thumbs, area, el("div", "msg-actions", [
    button("Cancel", () => { state.editing = null; renderMessages(); }, "cancel"),
    button("Send", send, "primary save-edit"),
  ])]);
}

function assistantView(conv, msg, index) {
  const body = el("div", "msg-text markdown");
  body.append(renderMarkdown(msg.text));
  const view = el("article", "msg assistant", [body]);
  if (state.busy && state.busy.msg === msg) {
    view.classList.add("streaming");
    state.busy.body = body;
    return view;
  }
  if (msg.stopped) view.append(el("div", "msg-note", ["Stopped."]));
  if (msg.finish === "length") view.append(el("div", "msg-note", ["Cut off at the max tokens setting."]));
  const actions = [button("Copy", () => navigator.clipboard?.writeText(msg.text), "copy", "Copy the answer")];
  if (index === conv.messages.length - 1) actions.unshift(button("Regenerate", () => regenerate(conv), "regenerate"));
  view.append(el("div", "msg-actions", actions));
  return view;
}

function errorView(conv, msg, index) {
  const view = el("article", "msg error", [el("div", "msg-text", [msg.text])], {role: "alert"});
  if (index === conv.messages.length - 1) {
    view.append(el("div", "msg-actions", [button("Retry", () => regenerate(conv), "regenerate")]));
  }
  return view;
}

function renderMessages() {
  const conv = current();
  const box = $("messages");
  const views = conv ? conv.messages.map((msg, i) =>
    (msg.role === "user" ? userView : msg.role === "assistant" ? assistantView : errorView)(conv, msg, i)) : [];
  box.replaceChildren(...(views.length ? views : [$("empty-template").content.cloneNode(true)]));
  updateBusy();
  box.scrollTop = box.scrollHeight;
}

function renderAll() {
  renderSidebar();
  renderMessages();
}

// While an answer streams, only its own element is redrawn, at most once a frame.
let frameRequested = false;
function updateStreaming() {
  if (frameRequested) return;
  frameRequested = true;
  requestAnimationFrame(() => {
    frameRequested = false;
    const busy = state.busy;
    if (!busy || !busy.body || !busy.body.isConnected) return;
    const box = $("messages");
    const atBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 40;
    busy.body.replaceChildren(renderMarkdown(busy.msg.text));
    if (atBottom) box.scrollTop = box.scrollHeight;
  });
}

function updateBusy() {
  const busy = Boolean(state.busy);
  $("send").hidden = busy;
  $("stop").hidden = !busy;
  $("send").disabled = !state.config;
  for (const b of document.querySelectorAll("#messages .msg-actions button.edit, #messages .regenerate")) {
    b.disabled = busy;
  }
}

function renderAttachments() {
  $("attachments").replaceChildren(...state.attachments.map((a) => {
    const img = el("img", null, null, {alt: a.name});
    img.src = a.preview;
    const size = a.image ? (a.image.resized ? `${a.image.from[0]}\u00d7${a.image.from[1]} \u2192 ${a.image.width}\u00d7${a.image.height}`
                                           : a.image.width ? `${a.image.width}\u00d7${a.image.height}` : "") : "\u2026";
    const remove = button("\u00d7", () => removeAttachment(a.id), "remove", `Remove ${a.name}`);
    remove.setAttribute("aria-label", `Remove ${a.name}`);
    return el("figure", "thumb", [img, remove, el("figcaption", null, [size])], {title: a.name});
  }));
}

function showStats(usage, started, first, finished) {
  if (!usage) {
    $("stats").textContent = "";
    return;
  }
  const seconds = (finished - started) / 1000;
  const parts = [`${usage.completion_tokens} tokens in ${seconds.toFixed(2)} s`];
  if (usage.completion_tokens >= 4 && first !== null && finished > first) {  // a rate of 1-3 tokens means little
    parts.push(`${((usage.completion_tokens - 1) / ((finished - first) / 1000)).toFixed(1)} tokens/s`);
  }
  if (first !== null) parts.push(`first token after ${((first - started) / 1000).toFixed(2)} s`);
  const images = usage.prompt_tokens_details?.image_tokens;
  parts.push(`prompt ${usage.prompt_tokens} tokens${images ? ` (${images} for images)` : ""}`);
  $("stats").textContent = `Last answer: ${parts.join(" \u00b7 ")}`;
}

// ------------------------------------------------------------------ conversations
function selectConversation(id) {
  state.currentId = id;
  state.editing = null;
  $("layout").classList.remove("sidebar-open");
  save();
  renderAll();
}

function deleteConversation(id) {
  if (!confirm("Delete this conversation?")) return;
  if (state.busy && state.busy.conv.id === id) state.busy.controller.abort();
  state.conversations = state.conversations.filter((c) => c.id !== id);
  if (state.currentId === id) state.currentId = null;
  save();
  renderAll();
}

function newConversation() {
  state.currentId = null;
  state.editing = null;
  $("layout").classList.remove("sidebar-open");
  save();
  renderAll();
  $("prompt").focus();
}

// ------------------------------------------------------------------ attachments
let attachmentSeq = 0;

function addFiles(files) {
  const list = [...files];
  const images = list.filter(isImage);
  const others = list.filter((f) => !isImage(f)).map((f) => f.name || "a file");
  if (others.length) showNotice(`Not an image, so not attached: ${others.join(", ")}`);
  if (!images.length) return;
  if (state.config && !state.config.max_image_size) {
    showNotice("This model does not take images.");
    return;
  }
  for (const file of images) {
    const a = {id: ++attachmentSeq, name: file.name || "pasted image", preview: URL.createObjectURL(file), image: null};
    a.ready = prepareImage(file, state.config ? state.config.max_image_size : 0, state.settings.resize)
      .then((image) => { a.image = image; renderAttachments(); return image; })
      .catch((e) => { removeAttachment(a.id); showNotice(`Could not read ${a.name}: ${e.message}`); return null; });
    state.attachments.push(a);
  }
  renderAttachments();
}

function removeAttachment(id) {
  const a = state.attachments.find((x) => x.id === id);
  if (a) URL.revokeObjectURL(a.preview);
  state.attachments = state.attachments.filter((x) => x.id !== id);
  renderAttachments();
}

// ------------------------------------------------------------------ sending
function apiMessages(conv) {
  const messages = [];
  if (state.settings.system.trim()) messages.push({role: "system", content: state.settings.system});
  for (const m of conv.messages) {
    if (m.role === "user") {
      if (!m.images.length) {
        messages.push({role: "user", content: m.text});
      } else {
        const parts = m.images.map((url) => ({type: "image_url", image_url: {url}}));
        if (m.text) parts.push({type: "text", text: m.text});
        messages.push({role: "user", content: parts});
      }
    } else if (m.role === "assistant" && m.text) {
      messages.push({role: "assistant", content: m.text});  // a stopped answer counts as what was said
    }
  }
  return messages;
}

function requestBody(conv) {
  const s = state.settings;
  let extra = {};
  try { extra = s.extra.trim() ? JSON.parse(s.extra) : {}; } catch { /* checked when saved */ }
  // The extra parameters may override sampling, never what makes this a streamed chat.
  return {temperature: Number(s.temperature), max_tokens: Number(s.maxTokens), ...extra,
          model: state.config.model, messages: apiMessages(conv), stream: true, stream_options: {include_usage: true}};
}

async function send() {
  if (state.busy || !state.config) return;
  const text = $("prompt").value;
  if (!text.trim() && !state.attachments.length) return;
  const attachments = state.attachments;
  const images = (await Promise.all(attachments.map((a) => a.ready))).filter(Boolean);
  if (images.length < attachments.length) return;  // one could not be read: the notice says which
  let conv = current();
  if (!conv) {
    conv = {id: newId(), title: text.trim().slice(0, 60) || "Image chat", updated: Date.now(), messages: []};
    state.conversations.push(conv);
    state.currentId = conv.id;
  }
  conv.messages.push({role: "user", text, images: images.map((i) => i.dataUrl), stopped: false, finish: ""});
  for (const a of attachments) URL.revokeObjectURL(a.preview);
  state.attachments = [];
  renderAttachments();
  $("prompt").value = "";
  autosize();
  showNotice("");
  await generate(conv);
}

function regenerate(conv) {
  if (state.busy) return;
  while (conv.messages.length && conv.messages[conv.messages.length - 1].role !== "user") conv.messages.pop();
  if (conv.messages.length) generate(conv);
}

async function generate(conv) {
  const msg = {role: "assistant", text: "", images: [], stopped: false, finish: ""};
  conv.messages.push(msg);
  conv.updated = Date.now();
  const controller = new AbortController();
  const body = requestBody(conv);
  state.busy = {controller, conv, msg, body: null};
  renderAll();
  const started = performance.now();
  let first = null, usage = null, error = null;
  try {
    for await (const event of streamChat(body, state.apiKey, controller.signal)) {
      if (event.usage) usage = event.usage;
      const choice = event.choices && event.choices[0];
      if (!choice) continue;
      if (choice.delta && choice.delta.content) {
        if (first === null) first = performance.now();
        msg.text += choice.delta.content;
        updateStreaming();
      }
      if (choice.finish_reason) msg.finish = choice.finish_reason;
    }
  } catch (e) {
    if (controller.signal.aborted) {
      msg.stopped = true;
    } else {
      error = e;
    }
  } finally {
    state.busy = null;
  }
  if (!msg.text) conv.messages.splice(conv.messages.indexOf(msg), 1);
  if (error) conv.messages.push({role: "error", text: describeError(error), images: [], stopped: false, finish: ""});
  showStats(usage, started, first, performance.now());
  save();
  renderAll();
  if (error instanceof ApiError && error.status === 401) {
    await askKey("The server refused the API key; enter it again.");
    $("key-dialog").close();
  }
  $("prompt").focus();
}

function stop() {
  if (state.busy) state.busy.controller.abort();
}

// ------------------------------------------------------------------ settings
function openSettings() {
  const s = state.settings;
  $("set-system").value = s.system;
  $("set-temperature").value = s.temperature;
  $("set-max-tokens").value = s.maxTokens;
  $("set-resize").checked = s.resize;
  $("set-extra").value = s.extra;
  $("settings-error").hidden = true;
  $("settings").showModal();
}

function saveSettingsForm(event) {
  const fail = (message) => {
    event.preventDefault();
    $("settings-error").textContent = message;
    $("settings-error").hidden = false;
  };
  const temperature = Number($("set-temperature").value);
  const maxTokens = Number($("set-max-tokens").value);
  const extra = $("set-extra").value.trim();
  if (!Number.isFinite(temperature) || temperature < 0) return fail("Temperature must be a number, 0 or more.");
  if (!Number.isInteger(maxTokens) || maxTokens < 1) return fail("Max tokens must be a whole number, 1 or more.");
  if (extra) {
    let parsed;
    try { parsed = JSON.parse(extra); } catch (e) { return fail(`Extra parameters are not valid JSON: ${e.message}`); }
    if (!parsed || typeof parsed !== "object" || Array.isArray(parsed)) {
      return fail('Extra parameters must be a JSON object, e.g. {"top_p": 0.9}.');
    }
  }
  state.settings = {system: $("set-system").value, temperature, maxTokens, resize: $("set-resize").checked, extra};
  saveSettings();
}

// ------------------------------------------------------------------ wiring
function autosize() {
  const area = $("prompt");
  area.style.height = "auto";  // CSSOM, which the page's CSP allows (no inline style attributes)
  area.style.height = `${Math.min(area.scrollHeight, 200)}px`;
}

function wire() {
  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    send();
  });
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      send();
    }
  });
  $("prompt").addEventListener("input", autosize);
  $("stop").addEventListener("click", stop);
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape" && state.busy && !document.querySelector("dialog[open]")) stop();
  });
  $("file-input").addEventListener("change", (event) => {
    addFiles(event.target.files);
    event.target.value = "";  // the same file can be picked again
  });
  document.addEventListener("paste", (event) => {
    const files = [...(event.clipboardData ? event.clipboardData.files : [])].filter(isImage);
    if (files.length) {
      event.preventDefault();
      addFiles(files);
    }
  });
  let dragDepth = 0;
  const hasFiles = (event) => event.dataTransfer && [...event.dataTransfer.types].includes("Files");
  document.addEventListener("dragenter", (event) => {
    if (!hasFiles(event)) return;
    dragDepth++;
    $("drop-overlay").hidden = false;
  });
  document.addEventListener("dragleave", () => {
    dragDepth = Math.max(0, dragDepth - 1);
    if (!dragDepth) $("drop-overlay").hidden = true;
  });
  document.addEventListener("dragover", (event) => {
    if (hasFiles(event)) event.preventDefault();  // allows the drop
  });
  document.addEventListener("drop", (event) => {
    if (!event.dataTransfer || !event.dataTransfer.files.length) return;
    event.preventDefault();  // the browser would otherwise open the image in place of the page
    dragDepth = 0;
    $("drop-overlay").hidden = true;
    addFiles(event.dataTransfer.files);
  });
  $("messages").addEventListener("click", (event) => {
    const copy = event.target.closest(".copy-code");
    if (copy) navigator.clipboard?.writeText(copy.parentElement.querySelector("pre").textContent);
  });
  $("new-chat").addEventListener("click", newConversation);
  $("toggle-sidebar").addEventListener("click", () => $("layout").classList.toggle("sidebar-open"));
  $("open-settings").addEventListener("click", openSettings);
  $("settings-form").addEventListener("submit", saveSettingsForm);
  $("settings-cancel").addEventListener("click", () => $("settings").close());
  $("forget-key").addEventListener("click", () => {
    localStorage.removeItem(KEYS.apiKey);
    state.apiKey = "";
    $("forget-key").hidden = true;
    $("settings").close();
    state.config = null;
    connect();
  });
}

wire();
renderAll();
renderAttachments();
connect();
