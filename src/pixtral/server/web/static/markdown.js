// A small Markdown renderer for the model's answers, safe by construction: it builds DOM nodes with
// createElement and textContent only (never innerHTML), so whatever the model writes -- <script>,
// <img onerror=...>, entities -- is shown as text. Links are made only for http(s) URLs.
//
// The subset: paragraphs (line breaks kept, as chat answers expect), fenced code blocks (also an
// unclosed one while an answer streams), headings, bullet and numbered lists, block quotes,
// inline code, bold, italic, links and bare URLs.

const FENCE = /^\s{0,3}(`{3,}|~{3,})\s*([\w+#.-]*)/;
const HEADING = /^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$/;
const BULLET = /^\s{0,3}[-*+]\s+(.*)$/;
const NUMBERED = /^\s{0,3}(\d{1,9})[.)]\s+(.*)$/;
const QUOTE = /^\s{0,3}>\s?(.*)$/;
const RULE = /^\s{0,3}([-*_])(\s*\1){2,}\s*$/;

function el(tag, className, children) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (children) node.append(...children);
  return node;
}

// Inline spans, earliest match first: `code`, **bold**, __bold__, *italic*, _italic_, [text](url), bare URL.
const INLINE = new RegExp([
  /(`+)([^`]|[^`][\s\S]*?[^`])\1(?!`)/.source,            // 1, 2: code
  /\*\*(?=\S)([\s\S]*?\S)\*\*/.source,                      // 3: bold
  /(?<![\w])__(?=\S)([\s\S]*?\S)__(?![\w])/.source,         // 4: bold (not inside a word: snake__case)
  /\*(?=[^\s*])([\s\S]*?[^\s*])\*/.source,                  // 5: italic
  /(?<![\w])_(?=[^\s_])([\s\S]*?[^\s_])_(?![\w])/.source,   // 6: italic
  /\[([^\]\n]+)\]\(\s*([^()\s]+)\s*\)/.source,              // 7, 8: link
  /(https?:\/\/[^\s<>"'`]*[^\s<>"'`.,;:!?)\]])/.source,     // 9: bare URL
].join("|"));

export function safeUrl(url) {
  try {
    const parsed = new URL(url);
    return parsed.protocol === "http:" || parsed.protocol === "https:" ? parsed.href : null;
  } catch {
    return null;
  }
}

function link(text, url) {
  const a = el("a", null, text);
  a.href = url;
  a.target = "_blank";
  a.rel = "noopener noreferrer";  // the opened page gets no handle on this one
  return a;
}

export function inline(text) {
  const nodes = [];
  let rest = text;
  while (rest) {
    const m = INLINE.exec(rest);
    if (!m) break;
    if (m.index) nodes.push(document.createTextNode(rest.slice(0, m.index)));
    if (m[1] !== undefined) {
      nodes.push(el("code", null, [m[2].length > 2 && m[2].startsWith(" ") && m[2].endsWith(" ") ? m[2].slice(1, -1) : m[2]]));
    } else if (m[3] !== undefined || m[4] !== undefined) {
      nodes.push(el("strong", null, inline(m[3] ?? m[4])));
    } else if (m[5] !== undefined || m[6] !== undefined) {
      nodes.push(el("em", null, inline(m[5] ?? m[6])));
    } else if (m[7] !== undefined) {
      const url = safeUrl(m[8]);
      nodes.push(url ? link(inline(m[7]), url) : document.createTextNode(m[0]));  // javascript: etc. stay text
    } else {
      const url = safeUrl(m[9]);
      nodes.push(url ? link([m[9]], url) : document.createTextNode(m[9]));
    }
    rest = rest.slice(m.index + m[0].length);
  }
  if (rest) nodes.push(document.createTextNode(rest));
  return nodes;
}

function linesWithBreaks(lines) {
  const nodes = [];
  lines.forEach((line, i) => {
    if (i) nodes.push(document.createElement("br"));
    nodes.push(...inline(line));
  });
  return nodes;
}

function codeBlock(lang, lines) {
  const code = el("code", null, [lines.join("\n")]);
  if (lang) code.dataset.lang = lang;
  const copy = el("button", "copy-code", ["Copy"]);
  copy.type = "button";
  copy.title = "Copy the code";
  return el("div", "code-block", [copy, el("pre", null, [code])]);
}

// Markdown text -> a DocumentFragment.
export function renderMarkdown(text) {
  const out = document.createDocumentFragment();
  const lines = String(text).replace(/\r\n?/g, "\n").split("\n");
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    let m;
    if (!line.trim()) {
      i++;
    } else if ((m = FENCE.exec(line))) {
      const fence = m[1];
      const body = [];
      i++;
      while (i < lines.length && !(lines[i].trim().startsWith(fence[0].repeat(fence.length)) &&
                                   !lines[i].trim().replace(new RegExp(`^\\${fence[0]}+`), "").trim())) {
        body.push(lines[i++]);
      }
      i++;  // the closing fence (or the end of an answer still streaming)
      out.append(codeBlock(m[2], body));
    } else if ((m = HEADING.exec(line))) {
      out.append(el(`h${Math.min(6, m[1].length + 2)}`, null, inline(m[2])));  // h3..h6: smaller than the page's own
      i++;
    } else if (RULE.test(line)) {
      out.append(document.createElement("hr"));
      i++;
    } else if (QUOTE.test(line)) {
      const body = [];
      while (i < lines.length && (m = QUOTE.exec(lines[i]))) { body.push(m[1]); i++; }
      out.append(el("blockquote", null, [renderMarkdown(body.join("\n"))]));
    } else if (BULLET.test(line) || NUMBERED.test(line)) {
      const numbered = !BULLET.test(line);
      const pattern = numbered ? NUMBERED : BULLET;
      const list = document.createElement(numbered ? "ol" : "ul");
      if (numbered && +NUMBERED.exec(line)[1] !== 1) list.start = +NUMBERED.exec(line)[1];
      let item = null;
      while (i < lines.length && lines[i].trim()) {
        if ((m = pattern.exec(lines[i]))) {
          item = [m[numbered ? 2 : 1]];
          list.append(el("li"));
        } else if (/^\s+\S/.test(lines[i]) || !(FENCE.test(lines[i]) || HEADING.test(lines[i]) ||
                   BULLET.test(lines[i]) || NUMBERED.test(lines[i]))) {
          item.push(lines[i].trim());  // a continuation of the item
        } else {
          break;
        }
        list.lastChild.replaceChildren(...linesWithBreaks(item));
        i++;
      }
      out.append(list);
    } else {
      const para = [];
      while (i < lines.length && lines[i].trim() && !FENCE.test(lines[i]) && !HEADING.test(lines[i]) &&
             !(para.length && (BULLET.test(lines[i]) || NUMBERED.test(lines[i]) || QUOTE.test(lines[i])))) {
        para.push(lines[i++]);
      }
      out.append(el("p", null, linesWithBreaks(para)));
    }
  }
  return out;
}
