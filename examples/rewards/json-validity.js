// 1 when the answer (or its first fenced code block) parses as a JSON object, else 0.
function reward(query, answer) {
  const fenced = /```(?:json)?\s*([\s\S]*?)```/.exec(answer);
  const text = (fenced ? fenced[1] : answer).trim();
  try {
    const v = JSON.parse(text);
    return v !== null && typeof v === 'object' ? 1 : 0;
  } catch {
    return 0;
  }
}
